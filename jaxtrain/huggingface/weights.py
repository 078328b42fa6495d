"""jaxtrain parameters <-> Hugging Face tensors, with the parametrization folded in.

jaxtrain stores parameters and computes with `multiplier * parameter` (the table's forward
multipliers: embedding, readout, NTK's 1/sqrt(fan_in), ...), scales attention logits by
the table's `attn_scale` and each residual branch by `residual`. A Llama / Qwen3 model
computes with its stored weights, 1/sqrt(head_dim) and unscaled branches. One factor per
parameter turns one into the other:

    hf = factor * parameter,   factor = multiplier                 (every parameter)
                                      * attn_scale * sqrt(head_dim) (wq; q_norm gain under QK-norm,
                                                                     which would normalize wq's away)
                                      * residual                     (wo and w_down: each branch's
                                                                     last matmul)

Every factor is linear in the function (RoPE, softmax input and residual sums are linear
in q, in the logits and in the branch outputs), so the exported model's logits are
jaxtrain's. Import divides by the factors of the importing config's table, so its
function is preserved under any parametrization (`importer.py`). A mixture of experts'
router and experts fold the same way (`moe.py`): the router's factor is its role's
multiplier, each expert's down projection takes the residual factor as w_down does.

Layouts: jaxtrain matrices are (fan-in axes..., fan-out axes...), a Hugging Face Linear
weight is (out, in), so a matrix is flattened to 2-D and transposed; the embedding table is
(vocab, embed) in both. Stacked weights (leading `layers` axis) become one tensor per layer,
expert matrices ([layers, experts, ...]) one per layer and expert, layer-major. Every
parameter of the table has a tensor, or export and import refuse it. The factors are
applied in float64, one layer (and expert) at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import ModelConfig
from jaxtrain.huggingface import moe
from jaxtrain.model.parametrization import Table


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: str  # jaxtrain parameter path
    hf_name: str  # Hugging Face tensor name; `{i}` is the layer of a stacked weight, `{e}` the expert
    kind: str  # linear (HF stores it transposed, 2-D), table (embedding, as stored) or vector
    sparse: bool = False  # of the mixture-of-experts layers only (moe.sparse_layers)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


_LAYER = "model.layers.{i}."
_TENSORS = (
    Tensor("embed", "model.embed_tokens.weight", "table"),
    Tensor("blocks.attn_norm.scale", _LAYER + "input_layernorm.weight", "vector"),
    Tensor("blocks.attn.wq", _LAYER + "self_attn.q_proj.weight", "linear"),
    Tensor("blocks.attn.wk", _LAYER + "self_attn.k_proj.weight", "linear"),
    Tensor("blocks.attn.wv", _LAYER + "self_attn.v_proj.weight", "linear"),
    Tensor("blocks.attn.wo", _LAYER + "self_attn.o_proj.weight", "linear"),
    Tensor("blocks.attn.q_norm.scale", _LAYER + "self_attn.q_norm.weight", "vector"),
    Tensor("blocks.attn.k_norm.scale", _LAYER + "self_attn.k_norm.weight", "vector"),
    Tensor("blocks.mlp_norm.scale", _LAYER + "post_attention_layernorm.weight", "vector"),
)
_DENSE_MLP = (
    Tensor("blocks.mlp.w_gate", _LAYER + "mlp.gate_proj.weight", "linear"),
    Tensor("blocks.mlp.w_up", _LAYER + "mlp.up_proj.weight", "linear"),
    Tensor("blocks.mlp.w_down", _LAYER + "mlp.down_proj.weight", "linear"),
)
_EXPERTS = tuple(Tensor(path, name, "linear", sparse=True) for path, name in moe.TENSORS.items())
_HEAD = (
    Tensor("final_norm.scale", "model.norm.weight", "vector"),
    Tensor("lm_head", "lm_head.weight", "linear"),
)


def tensors(table: Table) -> list[Tensor]:
    """The tensors of the model `table` describes, in model order; a parameter without
    one (a shared expert, say) is refused in one line naming it."""
    mlp = _EXPERTS if "blocks.mlp.router" in table.rules else _DENSE_MLP
    found = [t for t in (*_TENSORS, *mlp, *_HEAD) if t.path in table.rules]
    unmapped = sorted(set(table.rules) - {t.path for t in found})
    if unmapped:
        raise UserError(f"parameter {unmapped[0]} has no tensor in the Hugging Face family of this model "
                        f"({len(unmapped)} such parameter(s))")
    return found


def _snap(factor: float) -> float:
    """1 where rounding alone makes a factor differ from it (1/sqrt(d) * sqrt(d)), so an
    SP model's weights are copied bit for bit."""
    return 1.0 if abs(factor - 1.0) < 1e-12 else factor


def fold_factors(table: Table, model: ModelConfig) -> dict[str, float]:
    """Hugging Face weight = factor * jaxtrain parameter, per parameter path (module docstring)."""
    factors = {path: rule.multiplier for path, rule in table.rules.items()}
    logit_ratio = table.forward.attn_scale * math.sqrt(model.head_dim)  # jaxtrain's scale / 1/sqrt(head_dim)
    factors["blocks.attn.q_norm.scale" if model.qk_norm else "blocks.attn.wq"] *= logit_ratio
    for branch_output in ("blocks.attn.wo", "blocks.mlp.w_down"):
        factors[branch_output] *= table.forward.residual
    return {path: _snap(factor) for path, factor in factors.items()}


def hf_shape(tensor: Tensor, table: Table) -> tuple[int, ...]:
    rule = table.rules[tensor.path]
    if tensor.kind != "linear":
        return rule.shape
    return math.prod(rule.shape[rule.fan_in_dims:]), math.prod(rule.shape[:rule.fan_in_dims])


def _hf_names(tensor: Tensor, table: Table, model: ModelConfig) -> list[str]:
    """The tensor's names, in the order of its stored slices (layer-major, then expert)."""
    rule = table.rules[tensor.path]
    if not tensor.stacked:
        return [tensor.hf_name]
    layers = moe.sparse_layers(model) if tensor.sparse else range(rule.layers)
    if len(layers) != rule.layers:
        raise ValueError(f"{tensor.path}: {rule.layers} stacked layers, Hugging Face layers {list(layers)}")
    experts = range(rule.experts) if "{e}" in tensor.hf_name else [0]
    return [tensor.hf_name.format(i=i, e=e) for i in layers for e in experts]


def _stored_shape(tensor: Tensor, table: Table) -> tuple[int, ...]:
    rule = table.rules[tensor.path]
    return (*([rule.layers] if rule.layers else []), *([rule.experts] if rule.experts else []), *rule.shape)


def expected_shapes(table: Table, model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model and its shape."""
    return {name: hf_shape(t, table) for t in tensors(table) for name in _hf_names(t, table, model)}


def to_hf(params: dict[str, np.ndarray], table: Table, model: ModelConfig, factors: dict[str, float],
          dtype: np.dtype) -> dict[str, np.ndarray]:
    """Flat jaxtrain params (path -> array) -> Hugging Face tensors (name -> array)."""
    out = {}
    for tensor in tensors(table):
        rule, value = table.rules[tensor.path], params[tensor.path]
        slices = value.reshape(-1, *rule.shape) if tensor.stacked else [value]
        for name, piece in zip(_hf_names(tensor, table, model), slices, strict=True):
            folded = np.asarray(piece, np.float64) * factors[tensor.path]
            if tensor.kind == "linear":
                folded = folded.reshape(math.prod(rule.shape[:rule.fan_in_dims]), -1).T
            out[name] = np.ascontiguousarray(folded.astype(dtype))
    return out


def from_hf(read: Callable[[str], np.ndarray], table: Table, model: ModelConfig,
            factors: dict[str, float]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (`read(name)`, shapes already checked) -> flat float32 jaxtrain
    params, each divided by its factor."""
    params = {}
    for tensor in tensors(table):
        rule = table.rules[tensor.path]
        slices = []
        for name in _hf_names(tensor, table, model):
            value = np.asarray(read(name), np.float64)
            if tensor.kind == "linear":
                value = value.T.reshape(rule.shape)
            slices.append((value / factors[tensor.path]).astype(np.float32))
        params[tensor.path] = np.stack(slices).reshape(_stored_shape(tensor, table))
    return params
