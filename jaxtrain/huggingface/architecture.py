"""jaxtrain's model as a Hugging Face architecture, and a Hugging Face `config.json` as
jaxtrain's model section.

jaxtrain's block is Llama's (pre-norm RMSNorm, half-split RoPE, GQA, SwiGLU, untied head,
no biases); with `qk_norm` it is Qwen3's (the same, plus an RMSNorm over head_dim on q and
k before RoPE), and with `model.moe` (and qk_norm) Qwen3-MoE's (`moe.py`). So a model
exports as `LlamaForCausalLM`, `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM` and loads
with no custom code. Both families compute the attention logits as q.k / sqrt(head_dim)
and add each branch to the residual stream unscaled; whatever jaxtrain's parametrization
does differently is folded into the weights (`weights.py`).

`model_fields` reads a `config.json` of those families back: every field it reads has its
type declared once (`HfArchitecture`, strict), so a string where a number belongs or a
null is one error line naming the file, the field and the expected type; anything jaxtrain
cannot compute exactly (tied embeddings, biases, another activation, RoPE scaling, sliding
windows, a head_dim that is not hidden_size / heads) is one error line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.schema import ModelConfig
from jaxtrain.huggingface import moe

# model_type -> the class transformers' AutoModelForCausalLM builds for it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", moe.MODEL_TYPE: moe.ARCHITECTURE}


def check_exportable(model: ModelConfig, command: str) -> None:
    """A model a family of ARCHITECTURES computes exactly (every dense one; MoE: `moe.py`)."""
    if model.moe.enabled:
        moe.check_exportable(model, command)


def family(model: ModelConfig) -> str:
    if model.moe.enabled:
        return moe.MODEL_TYPE
    return "qwen3" if model.qk_norm else "llama"


def hf_config(model: ModelConfig, *, max_positions: int, eos_id: int, dtype: str) -> dict[str, Any]:
    """The `config.json` of `model` (transformers 5 field names; `rope_theta` is also
    written at the top level, where transformers 4 reads it)."""
    kind = family(model)
    config = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.ff_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": model.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "rope_theta": model.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": eos_id,  # jaxtrain's documents are separated by the end-of-document token only
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if kind == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    elif kind == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.n_layers,
                      layer_types=["full_attention"] * model.n_layers)
    else:
        config.update(use_sliding_window=False, sliding_window=None, **moe.hf_fields(model))
    return config


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


class RopeParameters(BaseModel):
    """`rope_parameters` (transformers 5), as far as jaxtrain reads it."""

    model_config = ConfigDict(strict=True, extra="ignore")
    rope_type: str = "default"
    rope_theta: PositiveFloat = None  # absent: the top-level rope_theta; a null is refused (defaults are not validated)


class HfArchitecture(BaseModel):
    """Every field of a Llama / Qwen3 `config.json` that jaxtrain reads, with its type: the
    one place those fields are validated (strict: `"2"` is not an integer, `null` is not a
    number; a field that may be absent or null says so). Other fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    model_type: str
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None  # absent: as many as the attention heads
    head_dim: PositiveInt | None = None
    hidden_act: str = "silu"
    rms_norm_eps: PositiveFloat = 1e-6
    rope_theta: PositiveFloat = 10_000.0  # transformers 4; 5 writes rope_parameters
    rope_parameters: RopeParameters | None = None
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    use_sliding_window: bool = False
    pretraining_tp: PositiveInt = 1

    @property
    def theta(self) -> float:
        nested = self.rope_parameters.rope_theta if self.rope_parameters else None
        return nested if nested is not None else self.rope_theta


def _field_error(directory: Path, field: str, message: str) -> UserError:
    return UserError(f"{directory}/config.json field '{field}': {message}")


def read_architecture(config: dict[str, Any], directory: Path) -> HfArchitecture:
    """The typed fields of `config` (HfArchitecture); the first bad one is one error line
    naming the file, the field and the type it must have."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:  # another family: none of its other fields means anything here
        raise _field_error(directory, "model_type", f"{kind!r} is not one of {', '.join(ARCHITECTURES)} (the "
                                                    f"architectures jaxtrain computes exactly)")
    return _typed(HfArchitecture, config, directory)


def _typed(fields: type[BaseModel], config: dict[str, Any], directory: Path) -> Any:
    """`config` validated as `fields`; the first bad field is one error line."""
    try:
        return fields.model_validate(config)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            raise _field_error(directory, field, "missing (a required field)") from None
        expected = first["msg"].replace("Input should be", "expected")
        raise _field_error(directory, field, f"{expected}, got {first['input']!r}") from None


def model_fields(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """jaxtrain `model.*` values equivalent to a Llama / Qwen3 / Qwen3-MoE `config.json`
    (`model.moe` as a nested dict: a dense model's sets no experts)."""
    hf = read_architecture(config, directory)
    experts = _typed(moe.HfExperts, config, directory) if hf.model_type == moe.MODEL_TYPE else None
    heads, width = hf.num_attention_heads, hf.hidden_size
    kv_heads = hf.num_key_value_heads or heads
    rope_type = hf.rope_parameters.rope_type if hf.rope_parameters else "default"
    unsupported = {
        "tie_word_embeddings": (hf.tie_word_embeddings,
                                "the LM head is tied to the embedding; jaxtrain's head is a separate matrix"),
        "attention_bias": (hf.attention_bias, "attention projections with biases; jaxtrain's have none"),
        "mlp_bias": (hf.mlp_bias, "MLP projections with biases; jaxtrain's have none"),
        "hidden_act": (hf.hidden_act != "silu", f"{hf.hidden_act!r}; jaxtrain's MLP is SwiGLU (silu)"),
        "rope_parameters": (rope_type != "default" or bool(hf.rope_scaling),
                            "RoPE scaling; jaxtrain's RoPE is the default one"),
        "use_sliding_window": (hf.use_sliding_window, "sliding-window attention; jaxtrain's is full"),
        "head_dim": (hf.head_dim not in (None, width // heads) or width % heads,
                     f"{hf.head_dim} with hidden_size {width} and {heads} heads; jaxtrain's head_dim "
                     f"is hidden_size / num_attention_heads"),
        "num_key_value_heads": (heads % kv_heads != 0, f"{kv_heads} does not divide {heads} attention heads"),
        "pretraining_tp": (hf.pretraining_tp != 1, "tensor-parallel slicing of the projections"),
    }
    unsupported = {field: (bad, f"unsupported: {why}") for field, (bad, why) in unsupported.items()}
    unsupported.update(moe.unsupported(experts, hf.num_hidden_layers) if experts else {})
    for field, (bad, why) in unsupported.items():
        if bad:
            raise _field_error(directory, field, why)
    return {"vocab_size": hf.vocab_size, "d_model": width, "n_layers": hf.num_hidden_layers,
            "n_heads": heads, "n_kv_heads": kv_heads, "d_ff": hf.intermediate_size,
            "rope_theta": hf.theta, "qk_norm": hf.model_type != "llama", "norm_eps": hf.rms_norm_eps,
            "moe": moe.moe_fields(experts) if experts else {"n_experts": 0, "n_shared_experts": 0}}


def check_model_matches(model: ModelConfig, fields: dict[str, Any], directory: Path) -> None:
    """The config's model section must be the directory's model (one line naming the key,
    `model.moe.top_k` for one of model.moe)."""
    mine = model.model_dump()
    mine["n_kv_heads"], mine["d_ff"] = model.kv_heads, model.ff_dim
    mine["moe"]["expert_d_ff"] = model.moe.expert_width(model.ff_dim)
    theirs = {**{k: v for k, v in fields.items() if k != "moe"},
              **{f"moe.{k}": v for k, v in fields["moe"].items()}}
    for key, value in theirs.items():
        section, _, name = key.rpartition(".")
        value_here = mine[section][name] if section else mine[key]
        if value_here != value:
            raise ConfigError(f"model.{key}", f"is {value_here!r}, but the Hugging Face model {directory} "
                                              f"has {value!r}; set model.{key}={value}")
