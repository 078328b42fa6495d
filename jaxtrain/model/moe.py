"""Mixture-of-experts MLP: a router picks top_k of n_experts SwiGLU experts per token, and
every token is computed (dropless: no capacity factor, no token dropped).

With model.moe.n_experts > 0 it replaces the SwiGLU of the MoE blocks (every block, or
one in model.moe.moe_every: model/block_stack.py), inside the one stacked-layer scan. For
a token x (d), router W_r (d x E), experts E_e(x) = down_e(silu(x G_e) * (x U_e)):

    z = x W_r  (float32)          p = softmax(z)
    e = top_k(p + b)              the chosen experts; b = 0 unless balanced by a bias (below)
    g = p_e                       their gates, from the UNBIASED probabilities
    g <- g / sum(g)               if renormalize (Mixtral, Jiang et al. 2024; Qwen3-MoE's
                                  norm_topk_prob); else the raw probabilities (OLMoE,
                                  Muennighoff et al. 2024)
    y = sum_j g_j E_{e_j}(x)  [+ S(x)]

(Shazeer et al. 2017, "Outrageously Large Neural Networks"). S is the optional shared
expert, an always-on SwiGLU of width n_shared_experts * expert_d_ff added unweighted
(DeepSeek-AI 2024, "DeepSeek-V3", Sec. 2.1.2); the caller builds it (transformer._mlp).

Dropless dispatch (model/moe_dispatch.py; Gale et al. 2023, "MegaBlocks"): the N = B*T
tokens are replicated k times (N*k assignments), sorted by expert id, the experts applied to
their contiguous groups by `jax.lax.ragged_dot` (stacked weights G, U: [E, d, f], D: [E, f,
d], group sizes = tokens per expert), un-sorted, weighted by the gates and summed over k.

Auxiliary losses (`router_losses`, added to the training loss by step.loss_and_metrics),
from what each layer sows (MOE_SOWABLE), with f_i the fraction of the N*k assignments
routed to expert i and P_i the mean router probability of expert i over the N tokens:

    load balance (Fedus et al. 2021, "Switch Transformers", eq. 4-6):
        aux_l = E * sum_i f_i P_i            1 at perfectly uniform routing
    router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5):
        z_l = mean_tokens logsumexp(z)^2

    loss += aux_loss * mean_l aux_l + router_z_loss * mean_l z_l

AVERAGED over layers (not summed as in Switch), so a coefficient tuned at one depth means
the same at another (the depth-transfer rule of the parametrization). Only P carries a
gradient (f counts argmax choices). Every token of the batch is routed and counted,
including targets the loss masks under packing.

Auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3", Sec. 2.1.2; Wang et
al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Alg. 1),
with model.moe.bias_update_rate = u > 0: each MoE block keeps a bias b (E,), added to the
router probabilities for the top-k choice only (the gates stay the unbiased p, and no
gradient reaches b). After every optimizer step (step.train_step, `update_balance_bias`):

    b_i <- b_i + u * sign(mean_j load_j - load_i)

load_i the fraction of that step's assignments of the block routed to expert i (the
whole step's, over every microbatch): an overloaded expert's bias falls, an underloaded
one's rises, so the choice drifts towards balance without a loss term that would pull on
the router's gradient. b is model state, not a parameter (`BALANCE_BIAS`, an `Untrained`
variable: no optimizer, no decay; replicated on every device; checkpointed with the
params). Its unit is the probability's: DeepSeek-V3's u = 0.001 was for sigmoid scores in
(0, 1); a softmax over E experts puts p near 1/E, so u is a step relative to 1/E.

Sharding: the experts axis (`experts`) is split over the `expert` mesh axis (expert
parallelism; 1 by default), which is one more batch axis for the tokens. Each device
dispatches its own tokens (`moe_dispatch.dropless_on_devices`, shard_map over the batch
axes), exchanging them by all-to-all with the devices that hold their experts, through the
expert weights cast to the compute dtype and all-gathered over fsdp; their gradients are
reduce-scattered back, in the compute dtype (not in train.grad_reduce_dtype, as
model/fsdp.py does for the dense weights). The router is read whole on every device (each
routes its own tokens over all n_experts), whatever its storage layout.
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.moe import MoEConfig
from jaxtrain.config.schema import ModelConfig
from jaxtrain.model import fsdp
from jaxtrain.model.moe_dispatch import dropless_on_devices
from jaxtrain.model.parametrization import EXPERTS_AXIS, Untrained, unit_matrix
from jaxtrain.model.sharding import constrain, keep_stored

# What each MoE layer can sow (stacked over layers by the scan): per expert, the fraction of
# assignments (E,) and the mean router probability (E,); per layer, mean logsumexp(z)^2 and
# the mean router entropy.
MOE_SOWABLE = frozenset({"router_load", "router_prob", "router_z", "router_entropy"})
TOKENS = ("batch", "embed")  # the flattened tokens (B*T, d)
_IN = (EXPERTS_AXIS, "embed", "mlp")  # gate and up projections, [E, d, f]
_OUT = (EXPERTS_AXIS, "mlp", "embed")  # down projection, [E, f, d]
_ROUTER = ("embed", EXPERTS_AXIS)
_ROUTER_READ = ("embed", None)  # as the router's matmul reads it: all n_experts logits on every device
_EXPERT_AXES = (_IN, _IN, _OUT)  # gate, up, down
BALANCE_BIAS = "balance_bias"  # the name of b (E,) in a MoE module, with bias_update_rate > 0


class Routing(NamedTuple):
    logits: jax.Array  # (N, E) float32
    probs: jax.Array  # (N, E) softmax of the logits
    gates: jax.Array  # (N, k) the weights of the chosen experts
    experts: jax.Array  # (N, k) int32, their ids
    counts: jax.Array  # (E,) int32, assignments per expert


def route(logits: jax.Array, top_k: int, renormalize: bool, bias: jax.Array | None = None) -> Routing:
    """Softmax over experts, the top_k of them per token by probability (+ `bias` (E,), if
    given: the choice only), their gates: the unbiased probabilities (renormalised or not)."""
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs if bias is None else probs + jax.lax.stop_gradient(bias)
    experts = jax.lax.top_k(scores, top_k)[1]
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    counts = jnp.bincount(experts.reshape(-1), length=logits.shape[-1]).astype(jnp.int32)
    return Routing(logits, probs, gates, experts, counts)


class MoE(nnx.Module):
    """The routed experts (and the shared expert `shared`, if given) of one block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, shared: nnx.Module | None = None):
        moe = cfg.moe
        d, e, f = cfg.d_model, moe.n_experts, moe.expert_width(cfg.ff_dim)
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.router = unit_matrix(rngs, (d, e), _ROUTER, 1)
        # replicated (no logical axis to shard): every device chooses among every expert
        bias = Untrained(jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False)
        self.balance_bias = bias if moe.bias_update_rate > 0 else None  # its path's last key: BALANCE_BIAS
        self.w_gate = unit_matrix(rngs, (e, d, f), _IN, 1)
        self.w_up = unit_matrix(rngs, (e, d, f), _IN, 1)
        self.w_down = unit_matrix(rngs, (e, f, d), _OUT, 1)
        self.shared = shared

    def __call__(self, x: jax.Array, sow: Collection[str] = ()) -> jax.Array:
        """x (B, T, d) -> (B, T, d) in x's dtype; `sow`: the router statistics to record."""
        tokens = constrain(x.reshape(-1, x.shape[-1]), TOKENS)
        routing = self.route(tokens)
        weights = tuple(keep_stored(w[...], axes).astype(x.dtype)
                        for w, axes in zip((self.w_gate, self.w_up, self.w_down), _EXPERT_AXES))
        out = dropless_on_devices(tokens, routing.experts, routing.gates, weights, _EXPERT_AXES)
        out = constrain(out, TOKENS).reshape(x.shape)
        if self.shared is not None:
            out = out + self.shared(x)
        self._sow_statistics(sow, routing)
        return constrain(out, ("batch", "sequence", "embed"))

    def route(self, tokens: jax.Array) -> Routing:
        """The router on tokens (N, d): logits in float32 (weight and tokens cast to it)."""
        logits = fsdp.project("nd,de->ne", tokens.astype(jnp.float32), [self.router[...]], [_ROUTER], _ROUTER_READ)
        bias = None if self.balance_bias is None else self.balance_bias[...]
        return route(constrain(logits, ("batch", None)), self.top_k, self.renormalize, bias)

    def _sow_statistics(self, sow: Collection[str], routing: Routing) -> None:
        statistics = {
            "router_load": lambda: routing.counts / routing.experts.size,
            "router_prob": lambda: jnp.mean(routing.probs, axis=0),
            "router_z": lambda: jnp.mean(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1))),
            "router_entropy": lambda: jnp.mean(jnp.sum(jax.scipy.special.entr(routing.probs), axis=-1)),
        }
        for name, compute in statistics.items():
            if name in sow:
                self.sow(nnx.Intermediate, name, compute(), reduce_fn=lambda _, new: new, init_fn=lambda: None)


def router_losses(sown: dict[str, jax.Array], moe: MoEConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the term added to the loss, the moe/* metrics) from the layers' stacked statistics
    (`MOE_SOWABLE`, leading axis layers); see the module docstring."""
    load, prob = sown["router_load"], sown["router_prob"]  # (L, E) each
    balance = load.shape[-1] * jnp.sum(load * prob, axis=-1)  # (L,), 1 when uniform
    aux = moe.aux_loss * jnp.mean(balance)
    z_loss = moe.router_z_loss * jnp.mean(sown["router_z"])
    metrics = {"moe/aux_loss": aux, "moe/router_z_loss": z_loss, "moe/balance": jnp.mean(balance),
               "moe/router_entropy": jnp.mean(sown["router_entropy"]),
               "moe/load_max": jnp.max(load), "moe/load_min": jnp.min(load)}
    return aux + z_loss, metrics


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """b_i <- b_i + rate * sign(mean_j load_j - load_i) for each MoE block (rows of `bias`
    and `load`, (blocks, E); load: fractions or counts of the step's assignments), the
    auxiliary-loss-free balancing rule of the module docstring (DeepSeek-V3 Sec. 2.1.2)."""
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
