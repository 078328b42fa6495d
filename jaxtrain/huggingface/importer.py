"""A Hugging Face Llama / Qwen3 / Qwen3-MoE directory as jaxtrain parameters (`train.init_from.huggingface`,
`jaxtrain import`).

The config's model section must be the directory's model (`architecture.model_fields`);
its parametrization may be anything. Each weight is divided by the factor that export
multiplies it by (`weights.fold_factors`, from the importing config's table), so the
imported model computes the Hugging Face model's function at step 0 under SP, muP, NTK or
CompleteP alike, and training then follows the config's table from there. With the
default base shape (parametrization.d0/L0 unset = the imported shape) every factor but the
attention and residual ones is 1, and the table's learning-rate rules are those of SP at
that shape; a smaller d0/L0 makes the imported model the wide/deep member of a muP family
tuned at the base shape.

Everything is checked before any training state exists: the architecture (every field
config.json must have, typed: `architecture.HfArchitecture`), every tensor's name, shape
and dtype (float32, float16 or bfloat16), that every value is finite (each tensor is read
once for it), and, where the directory has a tokenizer.json, that it is readable and the
data's tokenizer. Each refusal is one line naming the file and the field or tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.schema import Config, ModelConfig
from jaxtrain.data.sources import run_tokenizer
from jaxtrain.huggingface import architecture, files, weights
from jaxtrain.model.parametrization import Table, path_str


@dataclasses.dataclass
class HfModel:
    directory: Path
    config: dict[str, Any]
    fields: dict[str, Any]  # jaxtrain model.* values
    weights: files.WeightFiles


def open_model(directory: str | Path) -> HfModel:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such Hugging Face model directory")
    config = architecture.read_config(directory)
    fields = architecture.model_fields(config, directory)
    return HfModel(directory, config, fields, files.WeightFiles(directory))


def check_tensors(model: HfModel, table: Table, config: ModelConfig) -> None:
    """Every tensor the model needs, with its shape, and no other (biases, say)."""
    found, expected = model.weights.shapes(), weights.expected_shapes(table, config)
    for name, shape in expected.items():
        if name not in found:
            raise UserError(f"{model.directory}: has no tensor {name} (the weights do not match config.json)")
        if found[name] != shape:
            raise UserError(f"{model.directory}: tensor {name} has shape {list(found[name])}, "
                            f"config.json implies {list(shape)}")
    extra = sorted(set(found) - set(expected))
    biases = [name for name in extra if name.endswith(".bias")]
    if biases:
        raise UserError(f"{model.directory}: tensor {biases[0]} is a bias ({len(biases)} in all); "
                        f"jaxtrain's layers have none")
    if extra:
        raise UserError(f"{model.directory}: tensor {extra[0]} is not part of a {model.config['model_type']} "
                        f"model of this config.json ({len(extra)} such tensor(s))")
    for name in expected:
        model.weights.check_dtype(name)


def check_vocabulary(cfg: Config, model: HfModel) -> None:
    """The model's vocabulary must hold the data's; where the directory has a
    tokenizer.json, it must be the one the data was tokenized with."""
    data = run_tokenizer(cfg)
    if model.fields["vocab_size"] < data.vocab_size:
        raise UserError(f"{model.directory}/config.json field 'vocab_size': {model.fields['vocab_size']} is "
                        f"smaller than the vocabulary of this run's data ({data.vocab_size} ids, {data.kind})")
    path = model.directory / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer as HfTokenizer

    try:
        theirs = HfTokenizer.from_file(str(path)).get_vocab()
    except Exception as err:  # the Rust reader raises its own error types (truncated JSON, not a tokenizer)
        raise UserError(f"{path}: not a readable tokenizer file ({str(err).splitlines()[0][:200]})") from None
    mine = (files.byte_level_tokenizer() if data.kind == "byte" else data.tokenizer).get_vocab()
    if theirs != mine:
        raise ConfigError("train.init_from.huggingface",
                          f"{path} is not the tokenizer of this run's data ({data.kind}, {len(mine)} tokens vs "
                          f"{len(theirs)}); prepare the data with --tokenizer {path}")


def check_source(cfg: Config, table: Table, directory: str | Path, *, values: bool = True) -> HfModel:
    """All checks of importing `directory` into a run of `cfg`; with `values`, every
    tensor is read once (one at a time) to check that it is finite."""
    model = open_model(directory)
    check_vocabulary(cfg, model)
    architecture.check_model_matches(cfg.model, model.fields, model.directory)
    check_tensors(model, table, cfg.model)
    if values:
        for name in weights.expected_shapes(table, cfg.model):
            model.weights.read(name)  # checks the values; the array is dropped
    return model


def imported_params(cfg: Config, table: Table, like: Any, directory: str | Path) -> Any:
    """The directory's weights as a jaxtrain params tree shaped like `like` (any tree of the
    run's parameters: only its structure is read), host numpy float32, preserving their
    function under `cfg`'s parametrization."""
    model = check_source(cfg, table, directory, values=False)  # read() checks each value as it loads it
    flat = weights.from_hf(model.weights.read, table, cfg.model, weights.fold_factors(table, cfg.model))
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], like)


def place(params: Any, targets: Any) -> Any:
    """Host arrays onto the targets' shardings; each process supplies only its own shards."""
    return jax.tree.map(lambda value, target: jax.make_array_from_callback(
        value.shape, target.sharding, lambda index: np.asarray(value[index])), params, targets)
