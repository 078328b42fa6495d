"""Decoder-only transformer LM in Flax NNX.

token embedding -> n_layers x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

* RoPE on queries and keys (Su et al. 2021, "RoFormer"), half-split rotation.
* Causal multi-head attention with grouped-query option (Ainslie et al. 2023): n_kv_heads
  key/value heads shared by n_heads/n_kv_heads query heads each.
* Optional QK-norm: RMSNorm over head_dim on q and k before the dot product
  (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities").
* SwiGLU MLP (Shazeer 2020): down(silu(x W_gate) * (x W_up)).
* Untied LM head; logits are returned in float32 whatever the compute dtype.
* The blocks are STORED stacked: one `Block` module per kind created under `nnx.vmap`,
  so each of its weights has a leading `layers` axis (in the params, the optimizer state
  and the checkpoints): `blocks`, and with model.moe.moe_every > 1 the dense blocks
  between the MoE ones, `dense_blocks` (model/block_stack.py). The forward pass is one
  `lax.scan` over the groups of moe_every blocks (over the blocks when 1), so XLA
  compiles one group whatever the depth; `model.scan_layers: false` unrolls the same scan
  (one code path, same storage). `model.remat` wraps each block in `jax.checkpoint`.
  `Transformer.layer(i)` is block i as an ordinary `Block` (incremental decoding).
* `Transformer.__call__` is the only forward pass (telemetry, coord-check and inspection read
  what it sows, `nnx.Intermediate`, asked by name, via `forward_sown`): embedding_rms; attn_rms,
  mlp_rms (L,) of the branches; max_attn_logit (L,); attention_weights (L, B, N, T, T); log_z (B, T);
  with experts, the router statistics of model/moe.py (MOE_SOWABLE, one row per MoE block).
* Execution options (`model.dtype/attention/remat/scan_layers`) change how the step is
  computed, never the parameter tree; the model reads `dtype` and `attention` already
  resolved for the target devices (model/execution.py). The attention kernels (XLA, cuDNN,
  splash) and the scores telemetry reads are in model/attention.py.
* Incremental decoding (`Transformer.decode`) keeps each layer's keys and values in a
  `KVCache`: new tokens attend to every cached position up to their own.

Every parameter is created with logical axis names (`out_sharding` metadata):
  layers (stacked blocks only), vocab, embed (the model width), heads, kv_heads, head_dim, mlp,
  experts (a mixture of experts' routed experts, model/moe.py),
and matrices also say how many axes after `layers` they contract (`fan_in_dims`).
Activations are named too (batch, sequence, embed, heads, kv_heads, head_dim, mlp, vocab)
wherever their layout changes: `sharding.constrain` maps both to mesh axes by its compute
rules, and every weight is read through `model/fsdp.py` (cast to the compute dtype, then laid
out for compute: the FSDP all-gather happens there, in that dtype; its gradient is
reduce-scattered in train.grad_reduce_dtype). `parametrization.py` reads
the parameter names to give each parameter its role. Eager sharding is off: placement is
decided by `sharding.py`.

Values are created UNIT-SCALE (matrices N(0, 1), norm gains 1): the parametrization table
sets every init std (`parametrization.scale_init`) and the per-parameter forward
multipliers (`parametrization.effective_params`); the two activation-level rules, the
attention-logit scale and the residual-branch multiplier, arrive as `ForwardScales`.
"""

from __future__ import annotations

from typing import Callable, Collection

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ModelConfig
from jaxtrain.model import attention, block_stack
from jaxtrain.model.execution import compute_dtype_name
from jaxtrain.model.moe import MOE_SOWABLE, MoE
from jaxtrain.model.parametrization import ForwardScales, unit_matrix
from jaxtrain.model import fsdp
from jaxtrain.model.sharding import constrain, splits

def _save_all_but_layouts(primitive, *_, **__) -> bool:
    """remat none: keep every value for the backward pass except the outputs of layout
    changes (`sharding.constrain`, and the all-gathers of the expert weights under shard_map
    in model/moe.py). For activations the value before the change is kept instead (the same
    array); for a weight that is its shard, so FSDP gathers it again in the backward pass
    (ZeRO-3) instead of keeping every layer's full weights alive."""
    return primitive.name not in ("sharding_constraint", "all_gather")


# What the backward pass of a layer may reuse from its forward pass; none of them keeps a
# gathered weight (a weight in its compute layout is no matmul output either).
_REMAT_POLICIES = {"none": _save_all_but_layouts,
                   "dots_saveable": jax.checkpoint_policies.dots_saveable,
                   "full": jax.checkpoint_policies.nothing_saveable}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The compute dtype: the resolved `model.dtype` (step.model_spec resolves it for the
    target devices); an unresolved `auto` means this process's backend."""
    return jnp.dtype(compute_dtype_name(cfg))


def _project(subscripts: str, x: jax.Array, params: list[nnx.Param], axes: tuple[str | None, ...] | None = None,
             combine: Callable | None = None, **einsum_kwargs) -> jax.Array:
    """einsum(subscripts, x, W): W the weights `params` cast to x's dtype and `combine`d in their storage layout
    (`axes`: W's; default the one param's), then laid out for compute (`fsdp.project`: the FSDP all-gather in the
    compute dtype, the gradient's reduce-scatter in train.grad_reduce_dtype). The backward pass gathers W again."""
    return fsdp.project(subscripts, x, [p[...] for p in params], [_axes(p) for p in params], axes or _axes(params[0]),
                        combine, **einsum_kwargs)


def _axes(param: nnx.Param) -> tuple[str | None, ...]:
    return param.get_metadata()["out_sharding"]


ACTIVATION = ("batch", "sequence", "embed")  # the residual stream's axes
SOWABLE = frozenset({"embedding_rms", "attn_rms", "mlp_rms", "max_attn_logit", "attention_weights", "log_z",
                     *MOE_SOWABLE})


def rms(x: jax.Array) -> jax.Array:  # sqrt(mean(x^2)) over all entries, in float32
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _sow(module: nnx.Module, sow: Collection[str], name: str, compute: Callable[[], jax.Array]) -> None:
    """compute(), as this call's intermediate `name`, if `sow` asks for it (and only then)."""
    if name in sow:
        module.sow(nnx.Intermediate, name, compute(), reduce_fn=lambda _, new: new, init_fn=lambda: None)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * gain, computed in float32."""

    def __init__(self, dim: int, axis: str, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (x_i, x_{i+D/2}) by angle pos * theta^(-2i/D). x: (B, T, N, D)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """One layer's keys and values for positions [0, length); buffers hold max_len."""

    k: jax.Array  # (B, max_len, kv_heads, head_dim)
    v: jax.Array
    length: jax.Array  # int32 scalar: positions filled so far

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "KVCache":
        zeros = jnp.zeros((batch, max_len, cfg.kv_heads, cfg.head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32))

    def extend(self, k: jax.Array, v: jax.Array) -> "KVCache":
        at = (0, self.length, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                       jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
                       self.length + k.shape[1])


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


_Q = ("batch", "sequence", "heads", "head_dim")
_KV = ("batch", "sequence", "kv_heads", "head_dim")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, scale: float, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.cfg, self.scale = cfg, scale
        self.wq = unit_matrix(rngs, (d, n, h), ("embed", "heads", "head_dim"), 1)
        self.wk = unit_matrix(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wv = unit_matrix(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wo = unit_matrix(rngs, (n, h, d), ("heads", "head_dim", "embed"), 2)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, "head_dim", cfg.norm_eps)
            self.k_norm = RMSNorm(h, "head_dim", cfg.norm_eps)

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries (B, T, N, D), keys and values (B, T, K, D): projected, QK-normed, rotated.

        Where the tensor axis splits the kv heads, one matmul projects all three, with the
        weights grouped per kv head as (embed, kv_heads, N/K + 2, head_dim) (query head n
        reads kv head n // (N/K), as GQA does): its backward is one matmul too, so the
        input's gradient is all-reduced once (Megatron's fused QKV) instead of three times.
        Elsewhere three matmuls, which skip the grouping's copies (faster on CPU)."""
        n, k, h = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim
        if splits("kv_heads", k):
            group = lambda wq, wk, wv, g=(k, n // k, h): jnp.concatenate(  # noqa: E731 (k is reassigned below)
                [wq.reshape(-1, *g), wk[:, :, None], wv[:, :, None]], axis=2)
            qkv = _project("btd,dkgh->btkgh", x, [self.wq, self.wk, self.wv], ("embed", "kv_heads", None, "head_dim"), group)
            qkv = constrain(qkv, ("batch", "sequence", "kv_heads", None, "head_dim"))
            q, k, v = qkv[:, :, :, :-2].reshape(*x.shape[:2], n, h), qkv[:, :, :, -2], qkv[:, :, :, -1]
        else:
            q = constrain(_project("btd,dnh->btnh", x, [self.wq]), _Q)
            k = constrain(_project("btd,dkh->btkh", x, [self.wk]), _KV)
            v = constrain(_project("btd,dkh->btkh", x, [self.wv]), _KV)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta), v

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 segment_ids: jax.Array | None = None,
                 sow: Collection[str] = ()) -> tuple[jax.Array, KVCache | None]:
        """Causal self-attention over x by the `model.attention` kernel; `segment_ids` (B, T),
        if given, also hide keys of other documents. With a cache, over the cached positions
        and x (x's positions must continue the cache: cache.length, cache.length + 1, ...)."""
        q, k, v = self._qkv(x, positions)
        if cache is None:
            kernel = self.cfg.attention if self.cfg.attention != "auto" else attention.kernel_for(
                "auto", jax.default_backend(), q.dtype.name, q.shape[-1], q.shape[1])  # unresolved: here
            out = attention.attend(kernel, q, k, v, segment_ids, self.scale)
            _sow(self, sow, "max_attn_logit", lambda: attention.max_logit(q, k, segment_ids, self.scale))
            _sow(self, sow, "attention_weights", lambda: attention.weights(q, k, segment_ids, self.scale))
        else:
            cache = cache.extend(k, v)
            visible = jnp.arange(cache.k.shape[1])[None, :] <= positions[0][:, None]  # (T, max_len)
            out = jax.nn.dot_product_attention(q, cache.k, cache.v, mask=visible[None, None], scale=self.scale)
        out = constrain(out, _Q)
        return constrain(_project("btnh,nhd->btd", out, [self.wo]), ACTIVATION), cache



class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int | None = None):
        d, f = cfg.d_model, width or cfg.ff_dim
        self.w_gate = unit_matrix(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_up = unit_matrix(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_down = unit_matrix(rngs, (f, d), ("mlp", "embed"), 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Where the tensor axis splits the MLP width, gate and up are one matmul over the
        stacked (embed, 2, mlp) weights, so the input's gradient is all-reduced once."""
        hidden_axes = ("batch", "sequence", "mlp")
        if not splits("mlp", self.w_up.shape[-1]):
            gate = constrain(_project("btd,df->btf", x, [self.w_gate]), hidden_axes)
            up = constrain(_project("btd,df->btf", x, [self.w_up]), hidden_axes)
            return constrain(_project("btf,fd->btd", jax.nn.silu(gate) * up, [self.w_down]), ACTIVATION)
        gate_up = _project("btd,dcf->btcf", x, [self.w_gate, self.w_up], ("embed", None, "mlp"),
                           lambda g, u: jnp.stack([g, u], axis=1))
        gate_up = constrain(gate_up, ("batch", "sequence", None, "mlp"))
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        return constrain(_project("btf,fd->btd", hidden, [self.w_down]), ACTIVATION)


class Block(nnx.Module):
    """x + residual * Attn(RMSNorm(x)), then x + residual * MLP(RMSNorm(x)): the MLP a
    SwiGLU, or with `moe` a mixture of SwiGLU experts (model/moe.py)."""

    def __init__(self, cfg: ModelConfig, scales: ForwardScales, rngs: nnx.Rngs, moe: bool):
        self.dropout_rate, self.residual = cfg.dropout, scales.residual
        self.attn_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.attn = Attention(cfg, scales.attn_scale, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.mlp = _mlp(cfg, rngs) if moe else SwiGLU(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, key: jax.Array | None, cache: KVCache | None = None,
                 segment_ids: jax.Array | None = None,
                 sow: Collection[str] = ()) -> tuple[jax.Array, KVCache | None]:
        keys = jax.random.split(key) if key is not None else (None, None)
        attended, cache = self.attn(self.attn_norm(x), positions, cache, segment_ids, sow)
        _sow(self, sow, "attn_rms", lambda: rms(attended))  # the branch before dropout and residual scale
        x = x + self.residual * dropout(attended, self.dropout_rate, keys[0])
        normed = self.mlp_norm(x)
        branch = self.mlp(normed, sow) if isinstance(self.mlp, MoE) else self.mlp(normed)
        _sow(self, sow, "mlp_rms", lambda: rms(branch))
        branch = dropout(branch, self.dropout_rate, keys[1])
        return constrain(x + self.residual * branch, ACTIVATION), cache


def _mlp(cfg: ModelConfig, rngs: nnx.Rngs) -> MoE:
    moe = cfg.moe
    width = moe.expert_width(cfg.ff_dim)
    shared = SwiGLU(cfg, rngs, moe.n_shared_experts * width) if moe.n_shared_experts else None
    return MoE(cfg, rngs, shared)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, scales: ForwardScales):
        self.cfg = cfg
        self.embed = unit_matrix(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1)
        sizes = block_stack.stack_sizes(cfg)  # the attribute names are block_stack.MAIN and DENSE
        self.blocks = block_stack.stacked(lambda r: Block(cfg, scales, r, cfg.moe.enabled), sizes[block_stack.MAIN],
                                          rngs)
        self.dense_blocks = None if block_stack.DENSE not in sizes else block_stack.stacked(
            lambda r: Block(cfg, scales, r, False), sizes[block_stack.DENSE], rngs)
        self.final_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.lm_head = unit_matrix(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 1)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """The lookup reads the whole table (gathered once per step, like a weight), so its
        output is batch-sharded with no activation traffic over the tensor axis."""
        table = fsdp.gathered([self.embed[...]], [_axes(self.embed)], _axes(self.embed), compute_dtype(self.cfg),
                              compute_axes=(None, None))
        return constrain(jnp.take(table, tokens, axis=0), ACTIVATION)

    def __call__(self, tokens: jax.Array, dropout_key: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, sow: Collection[str] = ()) -> jax.Array:
        """tokens: (B, T) int -> logits (B, T, vocab) float32. With `segment_ids` (B, T)
        (packed documents), positions restart at every document and no token attends to
        another document's. `sow`: the intermediates of this pass to record (`forward_sown`)."""
        positions = segment_positions(segment_ids, tokens.shape)
        x = self.embed_tokens(tokens)
        _sow(self, sow, "embedding_rms", lambda: rms(x))
        logits = self.logits(self._scan_blocks(x, positions, dropout_key, segment_ids, sow))
        _sow(self, sow, "log_z", lambda: jax.nn.logsumexp(logits, axis=-1))
        return logits

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        logits = _project("btd,dv->btv", x, [self.lm_head], preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "sequence", "vocab"))

    def layer(self, index: int) -> Block:
        """Block `index` of the model as an ordinary Block (its weights sliced out of its stack)."""
        stack, entry = block_stack.locate(self.cfg, index)
        graphdef, stacked = nnx.split(getattr(self, stack))
        return nnx.merge(graphdef, jax.tree.map(lambda w: w[entry], stacked))

    def empty_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return [KVCache.empty(self.cfg, batch, max_len, compute_dtype(self.cfg)) for _ in range(self.cfg.n_layers)]

    def decode(self, tokens: jax.Array, caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        """Logits of `tokens` (B, T), which continue the cached sequence, and the caches
        extended by them. Prefill and one-token steps are the same call."""
        start = caches[0].length
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed_tokens(tokens)
        extended = []
        for index, cache in enumerate(caches):
            x, cache = self.layer(index)(x, positions, None, cache)
            extended.append(cache)
        return self.logits(x), extended

    def _scan_blocks(self, x: jax.Array, positions: jax.Array, dropout_key: jax.Array | None,
                     segment_ids: jax.Array | None, sow: Collection[str]) -> jax.Array:
        """x through every block: one `lax.scan` over the groups of stacked weights
        (model/block_stack.py; unrolled when `scan_layers` is off), each block
        rematerialised by `model.remat` (`_REMAT_POLICIES`); what the blocks sow leaves it
        stacked on a leading layers axis, in model order."""

        def run_block(block: Block, x: jax.Array, index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            (x, _), found = nnx.capture(block, nnx.Intermediate)(x, positions, key, segment_ids=segment_ids,
                                                                        sow=sow)
            return x, {path[-1]: variable.get_value() for path, variable in nnx.to_flat_state(found)}

        x, per_layer = block_stack.scan_groups(self.blocks, self.dense_blocks, self.cfg.moe.group_size, x, run_block,
                                               _REMAT_POLICIES[self.cfg.remat], not self.cfg.scan_layers)
        for name, values in per_layer.items():
            _sow(self, sow, name, lambda values=values: values)
        return x


def segment_positions(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """Positions (B, T) of packed rows: a token's position counts from the first token of its
    document (which documents a token sees is the attention kernel's: segment ids, not a
    T x T mask). Without segment ids: positions 0..T-1."""
    index = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    if segment_ids is None:
        return index
    starts_here = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                   segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    document_start = jax.lax.cummax(jnp.where(starts_here, index, 0), axis=1)
    return index - document_start


def forward_sown(model: Transformer, tokens: jax.Array, names: Collection[str],
                 segment_ids: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The logits of `model(tokens, dropout_key, segment_ids)` and the intermediates `names` that call sowed."""
    if unknown := set(names) - SOWABLE:
        raise ValueError(f"the model cannot sow {sorted(unknown)}; it sows {sorted(SOWABLE)}")
    logits, found = nnx.capture(model, nnx.Intermediate)(tokens, dropout_key, segment_ids=segment_ids, sow=names)
    return logits, nnx.to_pure_dict(found)
