"""jaxtrain's model as a Hugging Face architecture, and a Hugging Face `config.json` as
jaxtrain's model section.

jaxtrain's block is Llama's (pre-norm RMSNorm, half-split RoPE, GQA, SwiGLU, untied head,
no biases); with `qk_norm` it is Qwen3's (the same, plus an RMSNorm over head_dim on q and
k before RoPE). So a model exports as `LlamaForCausalLM` or `Qwen3ForCausalLM` and loads
with no custom code. Both families compute the attention logits as q.k / sqrt(head_dim)
and add each branch to the residual stream unscaled; whatever jaxtrain's parametrization
does differently is folded into the weights (`weights.py`).

`model_fields` reads a `config.json` of those families back; anything jaxtrain cannot
compute exactly (tied embeddings, biases, another activation, RoPE scaling, sliding
windows, a head_dim that is not hidden_size / heads) is one error line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxtrain.config import ModelConfig
from jaxtrain.errors import ConfigError, UserError

# model_type -> the class transformers' AutoModelForCausalLM builds for it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def family(model: ModelConfig) -> str:
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
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.n_layers,
                      layer_types=["full_attention"] * model.n_layers)
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


def _field_error(directory: Path, field: str, message: str) -> UserError:
    return UserError(f"{directory}/config.json field '{field}': {message}")


def rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))


def model_fields(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """jaxtrain `model.*` values equivalent to a Llama / Qwen3 `config.json`."""
    fail = lambda field, message: _field_error(directory, field, message)
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise fail("model_type", f"{kind!r} is not one of {', '.join(ARCHITECTURES)} (the architectures "
                                 f"jaxtrain computes exactly)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            raise fail(field, f"expected a positive integer, got {config.get(field)!r}")
    heads, width = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    unsupported = {
        "tie_word_embeddings": (config.get("tie_word_embeddings", False) is not False,
                                "the LM head is tied to the embedding; jaxtrain's head is a separate matrix"),
        "attention_bias": (bool(config.get("attention_bias")), "attention projections with biases; jaxtrain's have none"),
        "mlp_bias": (bool(config.get("mlp_bias")), "MLP projections with biases; jaxtrain's have none"),
        "hidden_act": (config.get("hidden_act", "silu") != "silu",
                       f"{config.get('hidden_act')!r}; jaxtrain's MLP is SwiGLU (silu)"),
        "rope_parameters": ((config.get("rope_parameters") or {}).get("rope_type", "default") != "default"
                            or bool(config.get("rope_scaling")), "RoPE scaling; jaxtrain's RoPE is the default one"),
        "use_sliding_window": (bool(config.get("use_sliding_window")), "sliding-window attention; jaxtrain's is full"),
        "head_dim": (config.get("head_dim") not in (None, width // heads) or width % heads,
                     f"{config.get('head_dim')} with hidden_size {width} and {heads} heads; jaxtrain's head_dim "
                     f"is hidden_size / num_attention_heads"),
        "num_key_value_heads": (heads % kv_heads != 0, f"{kv_heads} does not divide {heads} attention heads"),
        "pretraining_tp": (config.get("pretraining_tp", 1) != 1, "tensor-parallel slicing of the projections"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            raise fail(field, f"unsupported: {why}")
    return {"vocab_size": config["vocab_size"], "d_model": width, "n_layers": config["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": kv_heads, "d_ff": config["intermediate_size"],
            "rope_theta": rope_theta(config), "qk_norm": kind == "qwen3",
            "norm_eps": float(config.get("rms_norm_eps", 1e-6))}


def check_model_matches(model: ModelConfig, fields: dict[str, Any], directory: Path) -> None:
    """The config's model section must be the directory's model (one line naming the key)."""
    mine = model.model_dump()
    mine["n_kv_heads"], mine["d_ff"] = model.kv_heads, model.ff_dim
    for key, value in fields.items():
        if mine[key] != value:
            raise ConfigError(f"model.{key}", f"is {mine[key]!r}, but the Hugging Face model {directory} "
                                              f"has {value!r}; set model.{key}={value}")
