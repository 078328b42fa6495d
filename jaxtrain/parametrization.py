"""SP / muP / NTK with depth-muP / CompleteP: one table drives init, forward multipliers,
per-parameter learning rates, Adam epsilon and weight decay.

Every parameter gets exactly one ROLE, read from its logical axes (which dimensions grow
with width) and from how many leading axes it contracts (`fan_in_dims` metadata), never
from its name. Vocabulary is the only axis that does not grow with width. The blocks'
weights are stored stacked with a leading `layers` axis: it is neither width nor fan-in,
so a stacked weight's rule is that of one layer's slice (`ParamRule.layers` records the
stack size; every layer of a stack has the same rule, as every depth rule is per model).

    role       fan-in axes   fan-out axes   examples
    embedding  fixed         grow           token embedding (vocab, embed)
    hidden     grow          grow           attention and MLP projections
    readout    grow          fixed          LM head (embed, vocab)
    vector     one axis, no fan-in           RMSNorm gains

With m = d_model/d0 and r = n_layers/L0 (Yang et al. 2021, "Tensor Programs V", Table 3
in its multiplier form; Dey et al. 2025, "Don't be lazy: CompleteP", Table 1):

    role       init std                 forward mult   Adam LR            Adam eps        decay
    sp:
    embedding  sigma_emb                alpha_emb      eta                eps             lv
    hidden     sigma/sqrt(fan_in)       1              eta                eps             lambda
    readout    sigma/sqrt(fan_in)       alpha_out      eta                eps             lv
    vector     1                        1              eta                eps             lv
    mup (all gradients are Theta(1/m) under muP, so every eps scales 1/m):
    embedding  sigma_emb                alpha_emb      eta                eps/m           lv
    hidden     sigma/sqrt(fan_in)       1              eta/m * r^(a-1)    eps/m * r^-a    lambda*m^gamma
    readout    sigma/sqrt(d0)           alpha_out/m    eta                eps/m           lv
    vector     1                        1              eta                eps/m           lv
    ntk (Jacot et al. 2018): init N(0, sigma^2), forward mult 1/sqrt(fan_in) on hidden and
    readout, one learning rate.

lv = lambda if `decay_vector_like` else 0. Depth (a = depth_alpha > 0, any name): every
residual branch is multiplied by r^-a; hidden Adam LR by r^(a-1) and eps by r^-a
(a = 1 keeps the LR unchanged: CompleteP). Attention logits are scaled 1/sqrt(d_head), or
sqrt(d_head0)/d_head (muP's 1/d_head anchored at the base width). At m = r = 1 every
parametrization is SP exactly, so a base model can be tuned as SP and scaled as muP.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
from flax import nnx

from jaxtrain.config import Config
from jaxtrain.errors import UserError

VOCAB_AXIS = "vocab"  # the only logical axis that does not grow with width
LAYERS_AXIS = "layers"  # the leading axis of the stacked blocks' weights
ROLES = ("embedding", "hidden", "readout", "vector")


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """Everything the table says about one parameter."""

    role: str
    shape: tuple[int, ...]  # of one layer's slice for stacked weights
    fan_in_dims: int  # leading axes (of that slice) contracted by the forward pass
    init_std: float  # the parameter is created unit-scale and multiplied by this
    multiplier: float  # forward pass uses multiplier * parameter
    lr: float  # multiplies the scheduled learning rate
    eps: float  # multiplies optimizer.eps
    weight_decay: float  # multiplies optimizer.weight_decay
    layers: int = 0  # size of the leading `layers` axis of a stacked weight, 0 if not stacked

    def per_layer_paths(self, path: str) -> list[str]:
        """`blocks.attn.wq` -> blocks.0.attn.wq, blocks.1.attn.wq, ... (a stacked weight's
        layers, named as per-layer statistics are reported); other paths unchanged."""
        if not self.layers:
            return [path]
        head, _, rest = path.partition(".")
        return [f"{head}.{i}.{rest}" for i in range(self.layers)]


@dataclasses.dataclass(frozen=True)
class ForwardScales:
    """The table's rows that act on activations rather than on one parameter."""

    attn_scale: float  # attention logits = scale * q.k
    residual: float  # x + residual * branch(x)


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    width_mult: float
    depth_mult: float
    forward: ForwardScales
    rules: dict[str, ParamRule]  # by dotted parameter path

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "width_mult": self.width_mult, "depth_mult": self.depth_mult,
                "forward": dataclasses.asdict(self.forward),
                "rules": {path: {**dataclasses.asdict(r), "shape": list(r.shape)}
                          for path, r in self.rules.items()}}

    def labels(self, params: Any) -> Any:
        """The role of every leaf of a params tree (for optax.partition)."""
        return _map_paths(params, lambda path: self.rules[path].role)

    def per_leaf(self, params: Any, field: str) -> Any:
        return _map_paths(params, lambda path: getattr(self.rules[path], field))


def _map_paths(tree: Any, fn) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree)


def path_str(key_path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def classify(axes: tuple[str, ...], fan_in_dims: int) -> str:
    """The role of a parameter from its logical axes; see the module docstring."""
    if len(axes) == 1:
        return "vector"
    fan_in_grows = any(a != VOCAB_AXIS for a in axes[:fan_in_dims])
    fan_out_grows = any(a != VOCAB_AXIS for a in axes[fan_in_dims:])
    if fan_in_dims == 0 or fan_in_dims >= len(axes) or not (fan_in_grows or fan_out_grows):
        raise ValueError(f"no role for axes {axes} with {fan_in_dims} fan-in dims")
    return {(False, True): "embedding", (True, True): "hidden", (True, False): "readout"}[
        (fan_in_grows, fan_out_grows)]


def base_shape(cfg: Config) -> tuple[int, int]:
    p = cfg.parametrization
    return p.d0 or cfg.model.d_model, p.L0 or cfg.model.n_layers


def forward_scales(cfg: Config) -> ForwardScales:
    p, model = cfg.parametrization, cfg.model
    d0, l0 = base_shape(cfg)
    head_dim, head_dim0 = model.head_dim, p.head_dim0 or d0 / model.n_heads
    inverse = p.attn_scale == "inv" or (p.attn_scale == "auto" and p.name == "mup")
    attn = math.sqrt(head_dim0) / head_dim if inverse else 1.0 / math.sqrt(head_dim)
    residual = (model.n_layers / l0) ** -p.depth_alpha
    return ForwardScales(attn_scale=attn, residual=residual)


def _rule(cfg: Config, role: str, shape: tuple[int, ...], fan_in_dims: int) -> ParamRule:
    p = cfg.parametrization
    fan_in = math.prod(shape[:fan_in_dims])
    d0, l0 = base_shape(cfg)
    m, r, a = cfg.model.d_model / d0, cfg.model.n_layers / l0, p.depth_alpha
    mup, ntk = p.name == "mup", p.name == "ntk"
    vector_decay = 1.0 if p.decay_vector_like else 0.0
    eps = 1.0 / m if mup else 1.0
    depth_lr, depth_eps = (r ** (a - 1), r ** -a) if a > 0 else (1.0, 1.0)
    if role == "embedding":
        return ParamRule(role, shape, fan_in_dims, p.embed_std, p.embed_multiplier, 1.0, eps, vector_decay)
    if role == "vector":
        return ParamRule(role, shape, fan_in_dims, 1.0, 1.0, 1.0, eps, vector_decay)
    if role == "hidden":
        std, mult = (p.init_std, 1 / math.sqrt(fan_in)) if ntk else (p.init_std / math.sqrt(fan_in), 1.0)
        lr = (1.0 / m if mup else 1.0) * depth_lr
        decay = m**p.gamma if mup else 1.0
        return ParamRule(role, shape, fan_in_dims, std, mult, lr, eps * depth_eps, decay)
    # readout
    if ntk:
        std, mult = p.init_std, p.output_multiplier / math.sqrt(fan_in)
    elif mup:
        std, mult = p.init_std / math.sqrt(d0), p.output_multiplier / m
    else:
        std, mult = p.init_std / math.sqrt(fan_in), p.output_multiplier
    return ParamRule(role, shape, fan_in_dims, 0.0 if p.readout_zero_init else std, mult, 1.0, eps, vector_decay)


def build_table(cfg: Config, abstract_state: nnx.State) -> Table:
    """The resolved table for a model's abstract NNX state (shapes and axis metadata)."""
    rules = {}
    for key_path, variable in nnx.to_flat_state(abstract_state):
        meta = variable.get_metadata()
        axes, fan_in_dims = tuple(meta["out_sharding"]), meta.get("fan_in_dims", 0)
        shape = tuple(variable.get_value().shape)
        layers = shape[0] if axes[0] == LAYERS_AXIS else 0
        if layers:
            axes, shape = axes[1:], shape[1:]
        rule = _rule(cfg, classify(axes, fan_in_dims), shape, fan_in_dims)
        rules[".".join(str(k) for k in key_path)] = dataclasses.replace(rule, layers=layers)
    d0, l0 = base_shape(cfg)
    return Table(cfg.parametrization.name, cfg.model.d_model / d0, cfg.model.n_layers / l0,
                 forward_scales(cfg), rules)


def scale_init(table: Table, unit_params: Any) -> Any:
    """Unit-scale params (as the model creates them) -> initial params."""
    return jax.tree.map(lambda p, s: p * s, unit_params, table.per_leaf(unit_params, "init_std"))


def effective_params(table: Table, params: Any) -> Any:
    """The weights the forward pass uses: multiplier * parameter (skipped where it is 1)."""
    mults = table.per_leaf(params, "multiplier")
    return jax.tree.map(lambda p, c: p if c == 1.0 else p * c, params, mults)


def describe_difference(saved: dict, current: dict) -> str | None:
    """One line naming the first difference between two `Table.to_json()` dicts, or None."""
    for key in ("name", "width_mult", "depth_mult", "forward"):
        if saved.get(key) != current.get(key):
            return f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
    old, new = saved.get("rules", {}), current["rules"]
    if any(re.match(r"blocks\.\d+\.", path) for path in old):
        return ("the checkpoint stores one set of weights per layer (blocks.0.*, blocks.1.*, ...), the "
                "layout of jaxtrain before stacked layers; this version stores them stacked (blocks.*) "
                "and cannot resume it")
    for path in sorted(set(old) | set(new)):
        if path not in old or path not in new:
            return f"parameter {path} is only in the {'checkpoint' if path in old else 'new model'}"
        for field, value in new[path].items():
            if old[path].get(field) != value:
                return f"{path}.{field}: checkpoint has {old[path].get(field)!r}, this run has {value!r}"
    return None


def check_matches(saved: dict, table: Table) -> None:
    difference = describe_difference(saved, table.to_json())
    if difference:
        raise UserError(f"parametrization table differs from the checkpoint's ({difference}); "
                        f"use a new --workdir")
