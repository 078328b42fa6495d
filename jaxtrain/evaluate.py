"""Validation loss: the fixed validation batches, the evaluator the training loop calls,
and `jaxtrain eval` on any saved checkpoint.

The validation set of each data source is the first `data.val_batches` batches of
consecutive windows of its validation split (`pipeline.validation_batches`), the same at
every evaluation, so `jaxtrain eval WORKDIR --step N` reproduces the `val_loss` logged at
step N.

Reported quantities, with loss in nats per token (mean next-token cross-entropy, no z-loss):
    val_loss/<source>  each source's loss (logged when there are several)
    val_loss           the sources' losses averaged with their data.sources weights
    perplexity         exp(val_loss)
    bits per byte      loss / ln 2 * tokens / bytes, with the source's validation split's
                       tokens per UTF-8 byte (1 + documents/bytes for byte tokens; BPE ~0.3),
                       so runs with different tokenizers compare
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrain import sharding
from jaxtrain import train_step as ts
from jaxtrain.config import Config
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource, open_sources
from jaxtrain.errors import UserError
from jaxtrain.saved_run import SavedRun


def validation_set(cfg: Config, source: DataSource, mesh: Mesh) -> list:
    """A source's validation batches as global arrays; each process supplies its own rows."""
    batch_sharding = sharding.batch_sharding(mesh)
    local = pipeline.validation_batches(cfg, source, *sharding.process_rows(mesh, cfg.train.batch_size))
    to_global = lambda b: jax.make_array_from_process_local_data(batch_sharding, b)
    return [jax.tree.map(to_global, b) for b in local]


class Evaluator:
    """params -> {"val_loss", "val_bits_per_byte"[, "val_loss/<source>" ...]} over the
    fixed validation batches of every source."""

    def __init__(self, evaluate: Callable, cfg: Config, sources: list[DataSource], mesh: Mesh):
        self.evaluate, self.sources = evaluate, sources
        self.batches = [validation_set(cfg, source, mesh) for source in sources]
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]

    def __call__(self, params: Any) -> dict[str, float]:
        losses = [[self.evaluate(params, b) for b in batches] for batches in self.batches]
        per_source = [float(np.mean(jax.device_get(source_losses))) for source_losses in losses]
        result = {"val_loss": float(np.dot(self.weights, per_source)),
                  "val_bits_per_byte": float(np.dot(self.weights, [
                      loss / math.log(2) * s.val_tokens_per_byte for loss, s in zip(per_source, self.sources)]))}
        if len(self.sources) > 1:
            result.update({f"val_loss/{s.name}": loss for s, loss in zip(self.sources, per_source)})
        return result


def evaluate_run(run: SavedRun, data_paths: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Validation metrics of a saved checkpoint, on the run's own data or on `data_paths`
    (prepared dataset directories, or text files/globs split into train/validation by the
    same rule as `data.paths`)."""
    cfg = run.cfg
    if data_paths:
        cfg = cfg.model_copy(update={"data": _other_data(cfg, data_paths)})
    sharding.check_batch_divides(cfg, run.mesh)
    param_shardings = jax.tree.map(lambda p: p.sharding, run.params)
    evaluate = jax.jit(functools.partial(ts.eval_step, spec=run.spec),
                       in_shardings=(param_shardings, sharding.batch_sharding(run.mesh)),
                       out_shardings=sharding.replicated(run.mesh))
    try:
        sources = open_sources(cfg)
    except UserError as err:  # the paths came from --data, not from the config's data section
        if not data_paths:
            raise
        raise UserError(f"--data {' '.join(data_paths)}: {str(err).split(': ', 1)[-1]}") from None
    evaluator = Evaluator(evaluate, cfg, sources, run.mesh)
    result = evaluator(run.params)
    loss = result["val_loss"]
    tokens = sum(len(b) for b in evaluator.batches) * cfg.train.batch_size * cfg.data.seq_len
    return {**dataclasses.asdict(EvalReport(
        step=run.step, tokens_seen=run.tokens, val_loss=loss, perplexity=math.exp(loss),
        bits_per_byte=result["val_bits_per_byte"], val_tokens=tokens,
        data=[s.path for s in cfg.data.sources] or list(cfg.data.paths))),
        **{k: v for k, v in result.items() if k.startswith("val_loss/")}}


def _other_data(cfg: Config, data_paths: tuple[str, ...]):
    if all((Path(p).expanduser() / "metadata.json").exists() for p in data_paths):
        sources = tuple({"path": p} for p in data_paths)
        return cfg.data.model_validate({**cfg.data.model_dump(), "sources": sources, "phases": ()})
    return cfg.data.model_copy(update={"paths": tuple(data_paths), "sources": (), "phases": ()})


@dataclasses.dataclass(frozen=True)
class EvalReport:
    step: int
    tokens_seen: int  # training tokens of the checkpoint
    val_loss: float  # nats/token
    perplexity: float
    bits_per_byte: float
    val_tokens: int  # predicted tokens the figures average over
    data: list[str]
