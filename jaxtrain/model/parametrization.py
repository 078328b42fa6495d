"""SP / muP / NTK with depth-muP / CompleteP: one table drives init, forward multipliers,
per-parameter learning rates, Adam epsilon and weight decay.

Every parameter gets exactly one ROLE, read from its logical axes (which dimensions grow
with width) and from how many leading axes it contracts (`fan_in_dims` metadata), never
from its name. Vocabulary and experts are the axes that do not grow with width. The blocks'
weights are stored stacked with a leading `layers` axis: it is neither width nor fan-in,
so a stacked weight's rule is that of one layer's slice (`ParamRule.layers` records the
stack size; every layer of a stack has the same rule, as every depth rule is per model).
A mixture of experts' matrices (jaxtrain/model/moe.py) have a leading `experts` axis after
it, alike: neither width nor fan-in, so an expert matrix's rule is that of one expert's
(`ParamRule.experts`), a hidden matrix of fan-in d (gate, up) or expert_d_ff (down).

    role       fan-in axes   fan-out axes   examples
    embedding  fixed         grow           token embedding (vocab, embed)
    hidden     grow          grow           attention and MLP projections
    readout    grow          fixed          LM head (embed, vocab)
    router     grow          fixed experts  MoE router (embed, experts)
    vector     one axis, no fan-in           RMSNorm gains

One more role comes from the variable's type, not its axes: `untrained`, model state that
no gradient trains (an `Untrained` variable: the MoE balance bias of model/moe.py, which
the train step moves by its own rule). It is created at its value (init std 1, multiplier
1) and the optimizer leaves it alone (LR 0, no decay, no moments: `update: none`).

With m = d_model/d0 and r = n_layers/L0 (Yang et al. 2021, "Tensor Programs V", Table 3
in its multiplier form; Dey et al. 2025, "Don't be lazy: CompleteP", Table 1):

    role       init std                 forward mult   Adam LR            Adam eps        decay
    sp:
    embedding  sigma_emb                alpha_emb      eta                eps             lv
    hidden     sigma/sqrt(fan_in)       1              eta                eps             lambda
    readout    sigma/sqrt(fan_in)       alpha_out      eta                eps             lv
    router     sigma/sqrt(fan_in)       1              eta                eps             lv
    vector     1                        1              eta                eps             lv
    mup (all gradients are Theta(1/m) under muP, so every eps scales 1/m):
    embedding  sigma_emb                alpha_emb      eta                eps/m           lv
    hidden     sigma/sqrt(fan_in)       1              eta/m * r^(a-1)    eps/m * r^-a    lambda*m^gamma
    readout    sigma/sqrt(d0)           alpha_out/m    eta                eps/m           lv
    router     sigma/sqrt(d0)           1/m            eta                eps/m           lv
    vector     1                        1              eta                eps/m           lv
    ntk (Jacot et al. 2018): init N(0, sigma^2), forward mult 1/sqrt(fan_in) on hidden,
    readout and router, one learning rate.

The router is readout-like (fan-in d grows, its n_experts outputs do not), so muP's readout
argument applies to its logits z = x W_r (`_router_rule`): never zero-initialised (a zero
router ties every expert: equal gates, equal gradients), and without alpha_out (that is
the LM head's). What muP predicts for a mixture of experts: expert_d_ff is a width (the
down projection's fan-in, scaled like d_ff: init 1/sqrt(expert_d_ff), and the LR follows
m = d_model/d0 like every hidden matrix); n_experts and top_k are like n_layers without
depth scaling: no rule changes with them (the load balance, not the width, sets how many
tokens each expert sees).

lv = lambda if `decay_vector_like` else 0. Depth (a = depth_alpha > 0, any name; r counts
the model's blocks, n_layers, whichever stack holds them: model/block_stack.py): every
residual branch is multiplied by r^-a; hidden Adam LR by r^(a-1) and eps by r^-a
(a = 1 keeps the LR unchanged: CompleteP). Attention logits are scaled 1/sqrt(d_head), or
sqrt(d_head0)/d_head (muP's 1/d_head anchored at the base width). At m = r = 1 every
parametrization is SP exactly, so a base model can be tuned as SP and scaled as muP.

Muon (`optimizer.name: muon`, jaxtrain/optim/muon.py) replaces Adam on the hidden role only;
every other row above stays. Its rows (derivations in `muon_scale` and `_muon_rule`):

    optimizer.muon_scale   muon scale                  LR            decay
    spectral               sqrt(fan_out/fan_in)        r^(a-1)       lambda
    none                   1                           r^(a-1)       lambda
    rms_match              0.2 sqrt(max(fan_in, out))  Adam's row    Adam's row
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
from flax import nnx

from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.model import block_stack

VOCAB_AXIS = "vocab"  # a logical axis that does not grow with width
EXPERTS_AXIS = "experts"  # the other one: a mixture of experts' experts (jaxtrain/model/moe.py)
FIXED_AXES = (VOCAB_AXIS, EXPERTS_AXIS)
LAYERS_AXIS = "layers"  # the leading axis of the stacked blocks' weights
ROLES = ("embedding", "hidden", "readout", "router", "vector", "untrained")


class Untrained(nnx.Variable):
    """Model state that is not a parameter of the loss: stored, sharded and checkpointed
    with the params, given the table's `untrained` role (no optimizer, no decay)."""


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
    experts: int = 0  # size of the `experts` axis after it (a MoE expert matrix), 0 if none
    update: str = "adam"  # the update rule the optax chain gives it: adam, muon, or none (untrained)
    muon_scale: float = 0.0  # Muon: multiplies the orthogonalized update (0 under Adam)

    def per_layer_paths(self, path: str, block_ids: tuple[int, ...] | None = None) -> list[str]:
        """`blocks.attn.wq` -> blocks.0.attn.wq, blocks.1.attn.wq, ... (a stacked weight's
        layers, named as per-layer statistics are reported: by `block_ids`, the model
        index of each stack entry, if given; `Table.per_layer_paths` gives them); an expert
        matrix's `blocks.mlp.w_up` -> blocks.0.mlp.w_up.0, blocks.0.mlp.w_up.1, ...
        (layer-major, one per expert: the order of `value.reshape(-1, *shape)`); other
        paths unchanged."""
        experts = [f".{e}" for e in range(self.experts)] if self.experts else [""]
        if not self.layers:
            return [f"{path}{e}" for e in experts]
        head, _, rest = path.partition(".")
        return [f"{head}.{i}.{rest}{e}" for i in (block_ids or range(self.layers)) for e in experts]


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
    # stack name (model/block_stack.py: blocks, dense_blocks) -> the model index of each
    # of its layers; empty: a stack's layers are the model's blocks 0, 1, ...
    block_ids: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

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

    def per_layer_paths(self, path: str) -> list[str]:
        """`ParamRule.per_layer_paths` with each layer named by its block's index in the
        model (dense_blocks.0, blocks.1, dense_blocks.2, ... when model.moe.moe_every = 2)."""
        return self.rules[path].per_layer_paths(path, self.block_ids.get(path.partition(".")[0]))


def _map_paths(tree: Any, fn) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree)


def path_str(key_path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def classify(axes: tuple[str, ...], fan_in_dims: int) -> str:
    """The role of a parameter from its logical axes; see the module docstring."""
    if len(axes) == 1:
        return "vector"
    fan_in_grows = any(a not in FIXED_AXES for a in axes[:fan_in_dims])
    fan_out_grows = any(a not in FIXED_AXES for a in axes[fan_in_dims:])
    if fan_in_dims == 0 or fan_in_dims >= len(axes) or not (fan_in_grows or fan_out_grows):
        raise ValueError(f"no role for axes {axes} with {fan_in_dims} fan-in dims")
    if fan_in_grows and not fan_out_grows and EXPERTS_AXIS in axes[fan_in_dims:]:
        return "router"
    return {(False, True): "embedding", (True, True): "hidden", (True, False): "readout"}[
        (fan_in_grows, fan_out_grows)]


def unit_matrix(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], fan_in_dims: int) -> nnx.Param:
    """A unit-scale N(0, 1) matrix whose first `fan_in_dims` axes (after a leading `experts`
    axis, if any) are contracted: how the model creates every matrix, the metadata
    `build_table` reads (`scale_init` then gives it its init std)."""
    value = jax.random.normal(rngs.params(), shape, jax.numpy.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, fan_in_dims=fan_in_dims)


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
    depth_lr, depth_eps = _depth_lr(cfg), (r ** -a if a > 0 else 1.0)
    if role == "embedding":
        return ParamRule(role, shape, fan_in_dims, p.embed_std, p.embed_multiplier, 1.0, eps, vector_decay)
    if role == "vector":
        return ParamRule(role, shape, fan_in_dims, 1.0, 1.0, 1.0, eps, vector_decay)
    if role == "hidden":
        std, mult = (p.init_std, 1 / math.sqrt(fan_in)) if ntk else (p.init_std / math.sqrt(fan_in), 1.0)
        lr = (1.0 / m if mup else 1.0) * depth_lr
        decay = m**p.gamma if mup else 1.0
        return ParamRule(role, shape, fan_in_dims, std, mult, lr, eps * depth_eps, decay)
    if role == "router":
        return _router_rule(cfg, shape, fan_in_dims)
    if role == "untrained":
        return ParamRule(role, shape, fan_in_dims, 1.0, 1.0, 0.0, 1.0, 0.0, update="none")
    # readout
    if ntk:
        std, mult = p.init_std, p.output_multiplier / math.sqrt(fan_in)
    elif mup:
        std, mult = p.init_std / math.sqrt(d0), p.output_multiplier / m
    else:
        std, mult = p.init_std / math.sqrt(fan_in), p.output_multiplier
    return ParamRule(role, shape, fan_in_dims, 0.0 if p.readout_zero_init else std, mult, 1.0, eps, vector_decay)


def _router_rule(cfg: Config, shape: tuple[int, ...], fan_in_dims: int) -> ParamRule:
    """The MoE router W_r (d x n_experts): muP's readout rule without alpha_out or zero init.

    Its logits z = x W_r read a residual stream x of d Theta(1) coordinates. At init, W_r
    ~ N(0, sigma^2/d0) times the multiplier 1/m gives z_e = Theta(sqrt(d)/(sqrt(d0) m)) =
    Theta(m^-1/2): routing starts near uniform and stays Theta(1) learnable, as muP's readout
    (Yang et al. 2021, Table 3). Adam's update of W_r is Theta(eta) per entry whatever d;
    after the multiplier it moves z by d * eta/m * Theta(1) = Theta(eta d0): width-free,
    so the LR stays eta. Gradients are Theta(1/m) (the multiplier), hence eps/m. Without
    muP: SP's init sigma/sqrt(d) and multiplier 1 (NTK: N(0, sigma^2) and 1/sqrt(d)).
    Never zero-initialised, whatever readout_zero_init: a zero router gives every expert
    the same gate and every token the same top-k, and the experts' gradients stay tied.
    No weight decay unless decay_vector_like (like the other fixed-output roles)."""
    p, fan_in = cfg.parametrization, math.prod(shape[:fan_in_dims])
    d0 = base_shape(cfg)[0]
    m = cfg.model.d_model / d0
    decay = 1.0 if p.decay_vector_like else 0.0
    if p.name == "ntk":
        return ParamRule("router", shape, fan_in_dims, p.init_std, 1 / math.sqrt(fan_in), 1.0, 1.0, decay)
    if p.name == "mup":
        return ParamRule("router", shape, fan_in_dims, p.init_std / math.sqrt(d0), 1 / m, 1.0, 1 / m, decay)
    return ParamRule("router", shape, fan_in_dims, p.init_std / math.sqrt(fan_in), 1.0, 1.0, 1.0, decay)


def _depth_lr(cfg: Config) -> float:
    r, a = cfg.model.n_layers / base_shape(cfg)[1], cfg.parametrization.depth_alpha
    return r ** (a - 1) if a > 0 else 1.0


def muon_scale(rule: str, fan_in: int, fan_out: int) -> float:
    """The multiplier of a Muon role's orthogonalized update O (all singular values ~1):
    spectral   sqrt(fan_out/fan_in): ||dW||_op = lr * sqrt(fan_out/fan_in), the spectral
               condition for feature learning (Yang, Simon & Bernstein 2023, "A Spectral
               Condition for Feature Learning", Condition 1), so lr is width-independent;
    rms_match  0.2 sqrt(max(fan_in, fan_out)): RMS(dW) = 0.2 lr, AdamW's typical update RMS,
               so AdamW's learning rate and decay apply (Liu et al. 2025, "Muon is Scalable
               for LLM Training", Sec. 2.2);
    none       1."""
    return {"spectral": math.sqrt(fan_out / fan_in), "rms_match": 0.2 * math.sqrt(max(fan_in, fan_out)),
            "none": 1.0}[rule]


def _muon_rule(cfg: Config, rule: ParamRule) -> ParamRule:
    """The table's row under `optimizer.name: muon`. Hidden matrices get Muon:

        update = -lr(t) * lr_R * (muon_scale * O + lambda'_R * theta)

    spectral / none: lr_R = r^(a-1), the depth rule, and no width factor, since the scale
    (spectral) or the orthogonalization (none: ||O||_op = 1 for any shape) already fixes the
    update's spectral norm; decay_R = 1, so the per-step decay rate lr(t) * lambda does not
    change with width (the update does not, so neither does the weight norm it settles at).
    Depth rule, by CompleteP's argument (Dey et al. 2025, Sec. 4): each of the L branches is
    multiplied by r^-a and should move the residual stream by Theta(1/L) per step, so its
    weights need ||dW||_op ~ r^-1 / r^-a = r^(a-1). O's norm does not depend on the
    gradient's size (the r^-a in the gradient is normalized away), so, as for Adam, the
    rule is lr_R = r^(a-1): 1 under CompleteP (a = 1), r^-1/2 under depth-muP (a = 1/2).
    rms_match: lr_R and decay_R are AdamW's (its update has AdamW's RMS; Liu et al. 2025).
    Other roles keep their AdamW rows (the chain gives them optimizer.adam_lr, if set)."""
    opt = cfg.optimizer
    if rule.role != "hidden":
        return rule
    fan_in = math.prod(rule.shape[:rule.fan_in_dims])
    fan_out = math.prod(rule.shape[rule.fan_in_dims:])
    scale = muon_scale(opt.muon_scale, fan_in, fan_out)
    if opt.muon_scale == "rms_match":
        return dataclasses.replace(rule, update="muon", muon_scale=scale, eps=1.0)
    return dataclasses.replace(rule, update="muon", muon_scale=scale, lr=_depth_lr(cfg), eps=1.0, weight_decay=1.0)


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
        experts = shape[0] if len(axes) > 1 and axes[0] == EXPERTS_AXIS else 0
        if experts:
            axes, shape = axes[1:], shape[1:]
        role = "untrained" if isinstance(variable, Untrained) else classify(axes, fan_in_dims)
        rule = _rule(cfg, role, shape, fan_in_dims)
        if cfg.optimizer.name == "muon":
            rule = _muon_rule(cfg, rule)
        rules[".".join(str(k) for k in key_path)] = dataclasses.replace(rule, layers=layers, experts=experts)
    d0, l0 = base_shape(cfg)
    return Table(cfg.parametrization.name, cfg.model.d_model / d0, cfg.model.n_layers / l0,
                 forward_scales(cfg), rules, block_stack.block_ids(cfg.model))


def scale_init(table: Table, unit_params: Any) -> Any:
    """Unit-scale params (as the model creates them) -> initial params."""
    return jax.tree.map(lambda p, s: p * s, unit_params, table.per_leaf(unit_params, "init_std"))


def effective_params(table: Table, params: Any) -> Any:
    """The weights the forward pass uses: multiplier * parameter (skipped where it is 1)."""
    mults = table.per_leaf(params, "multiplier")
    return jax.tree.map(lambda p, c: p if c == 1.0 else p * c, params, mults)


_RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ParamRule) if f.default is not dataclasses.MISSING}


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
            saved_value = old[path].get(field, _RULE_DEFAULTS.get(field))  # a table saved before the field existed
            if saved_value != value:
                return f"{path}.{field}: checkpoint has {saved_value!r}, this run has {value!r}"
    return None


def check_matches(saved: dict, table: Table) -> None:
    difference = describe_difference(saved, table.to_json())
    if difference:
        raise UserError(f"parametrization table differs from the checkpoint's ({difference}); "
                        f"use a new --workdir")
