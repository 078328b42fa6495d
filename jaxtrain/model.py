"""Decoder-only transformer LM in Flax NNX.

token embedding -> n_layers x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

* RoPE on queries and keys (Su et al. 2021, "RoFormer"), half-split rotation.
* Causal multi-head attention with grouped-query option (Ainslie et al. 2023): n_kv_heads
  key/value heads shared by n_heads/n_kv_heads query heads each.
* Optional QK-norm: RMSNorm over head_dim on q and k before the dot product
  (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities").
* SwiGLU MLP (Shazeer 2020): down(silu(x W_gate) * (x W_up)).
* Untied LM head; logits are returned in float32 whatever the compute dtype.
* Execution options (`model.dtype/attention/remat/scan_layers`) change how the step is
  computed, never the parameter tree: blocks may be rematerialised (`jax.checkpoint`
  with a policy) and/or run as one `lax.scan` over their stacked weights.
* Incremental decoding (`Transformer.decode`) keeps each layer's keys and values in a
  `KVCache`: new tokens attend to every cached position up to their own.

Every parameter is created with logical axis names (`out_sharding` metadata):
  vocab, embed (the model width), heads, kv_heads, head_dim, mlp,
and matrices also say how many leading axes they contract (`fan_in_dims`). `sharding.py`
maps the names to mesh axes; `parametrization.py` reads them to give each parameter its
role. Eager sharding is off: placement is decided once, by `sharding.py`.

Values are created UNIT-SCALE (matrices N(0, 1), norm gains 1): the parametrization table
sets every init std (`parametrization.scale_init`) and the per-parameter forward
multipliers (`parametrization.effective_params`); the two activation-level rules, the
attention-logit scale and the residual-branch multiplier, arrive as `ForwardScales`.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.errors import ConfigError
from jaxtrain.parametrization import ForwardScales

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {"dots_saveable": jax.checkpoint_policies.dots_saveable,
                   "full": jax.checkpoint_policies.nothing_saveable}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The matmul/attention dtype; `auto` is bfloat16 on accelerators, float32 on CPU."""
    if cfg.dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return _DTYPES[cfg.dtype]


def check_compute(cfg: ModelConfig) -> None:
    """Execution options this backend cannot run, as a one-line config error."""
    if cfg.attention == "cudnn" and (jax.default_backend() != "gpu" or compute_dtype(cfg) == jnp.float32):
        raise ConfigError("model.attention", "cudnn needs a GPU and model.dtype bfloat16 "
                                             f"(backend {jax.default_backend()}, dtype {cfg.dtype})")


def _matrix(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], fan_in_dims: int) -> nnx.Param:
    """A unit-scale N(0, 1) matrix whose first `fan_in_dims` axes are contracted."""
    value = jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, fan_in_dims=fan_in_dims)


def sp_scales(cfg: ModelConfig) -> ForwardScales:
    return ForwardScales(attn_scale=1.0 / math.sqrt(cfg.head_dim), residual=1.0)


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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, scale: float, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.cfg, self.scale = cfg, scale
        self.wq = _matrix(rngs, (d, n, h), ("embed", "heads", "head_dim"), 1)
        self.wk = _matrix(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wv = _matrix(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wo = _matrix(rngs, (n, h, d), ("heads", "head_dim", "embed"), 2)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, "head_dim", cfg.norm_eps)
            self.k_norm = RMSNorm(h, "head_dim", cfg.norm_eps)

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries (B, T, N, D), keys and values (B, T, K, D): projected, QK-normed, rotated."""
        dtype = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(dtype))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta), v

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Causal self-attention over x; `mask` (B, 1, T, T), if given, also hides keys of
        other documents. With a cache, over the cached positions and x (x's positions
        must continue the cache: cache.length, cache.length + 1, ...)."""
        q, k, v = self._qkv(x, positions)
        if cache is None:
            implementation = None if self.cfg.attention == "auto" else self.cfg.attention
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=self.scale,
                                               implementation=implementation)
        else:
            cache = cache.extend(k, v)
            visible = jnp.arange(cache.k.shape[1])[None, :] <= positions[0][:, None]  # (T, max_len)
            out = jax.nn.dot_product_attention(q, cache.k, cache.v, mask=visible[None, None], scale=self.scale)
        return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(x.dtype)), cache

    def _scores(self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """scale * q.k (B, N, Tq, Tk), float32, -inf where the causal mask hides a key;
        query head n reads kv head n // (N / K)."""
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        logits = self.scale * jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
        causal = q_positions[:, :, None] >= k_positions[:, None, :]
        return jnp.where(causal[:, None], logits, -jnp.inf)

    def logits(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The masked attention logits (B, N, T, T) of x."""
        q, k, _ = self._qkv(x, positions)
        return self._scores(q, k, positions, positions)

    def weights(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The attention probabilities (B, N, T, T) of x, for inspection (float32)."""
        return jax.nn.softmax(self.logits(x, positions), axis=-1)

    def max_logit(self, x: jax.Array, positions: jax.Array, chunk: int = 256) -> jax.Array:
        """The largest attention logit any query gives any visible key (a scalar): the
        quantity whose growth precedes attention-logit divergence (Wortsman et al. 2023).
        Queries go `chunk` at a time so no (T, T) matrix is held at once."""
        q, k, _ = self._qkv(x, positions)
        maxima = [jnp.max(self._scores(q[:, s:s + chunk], k, positions[:, s:s + chunk], positions))
                  for s in range(0, x.shape[1], chunk)]
        return jnp.max(jnp.stack(maxima))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ff_dim
        self.w_gate = _matrix(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_up = _matrix(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_down = _matrix(rngs, (f, d), ("mlp", "embed"), 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jax.nn.silu(x @ self.w_gate[...].astype(dtype))
        return (gate * (x @ self.w_up[...].astype(dtype))) @ self.w_down[...].astype(dtype)


class Block(nnx.Module):
    """x + residual * Attn(RMSNorm(x)), then x + residual * SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, scales: ForwardScales, rngs: nnx.Rngs):
        self.dropout_rate, self.residual = cfg.dropout, scales.residual
        self.attn_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.attn = Attention(cfg, scales.attn_scale, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, key: jax.Array | None,
                 cache: KVCache | None = None, mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        keys = jax.random.split(key) if key is not None else (None, None)
        attended, cache = self.attn(self.attn_norm(x), positions, cache, mask)
        x = x + self.residual * dropout(attended, self.dropout_rate, keys[0])
        branch = dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])
        return x + self.residual * branch, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, scales: ForwardScales | None = None):
        scales = scales or sp_scales(cfg)
        self.cfg = cfg
        self.embed = _matrix(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1)
        self.blocks = nnx.List([Block(cfg, scales, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.lm_head = _matrix(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 1)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(compute_dtype(self.cfg))

    def __call__(self, tokens: jax.Array, dropout_key: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens: (B, T) int -> logits (B, T, vocab) float32. With `segment_ids` (B, T)
        (packed documents), positions restart at every document and no token attends to
        another document's."""
        positions, mask = segment_positions_and_mask(segment_ids, tokens.shape)
        x = self.embed_tokens(tokens)
        if self.cfg.remat == "none" and not self.cfg.scan_layers:
            for i, block in enumerate(self.blocks):
                x, _ = block(x, positions, _layer_key(dropout_key, i), mask=mask)
        else:
            x = self._blocks_as_function(x, positions, dropout_key, mask)
        return self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        return jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)

    def empty_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return [KVCache.empty(self.cfg, batch, max_len, compute_dtype(self.cfg)) for _ in self.blocks]

    def decode(self, tokens: jax.Array, caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        """Logits of `tokens` (B, T), which continue the cached sequence, and the caches
        extended by them. Prefill and one-token steps are the same call."""
        start = caches[0].length
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed_tokens(tokens)
        extended = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, positions, None, cache)
            extended.append(cache)
        return self.logits(x), extended

    def _blocks_as_function(self, x: jax.Array, positions: jax.Array, dropout_key: jax.Array | None,
                            mask: jax.Array | None) -> jax.Array:
        """The blocks as one pure function of (weights, x), rematerialised and/or scanned.

        With scan_layers the per-layer weights are stacked inside the step (one extra copy
        of the block weights) and `lax.scan` traces and compiles a single block; the
        parameter tree, and so checkpoints, are the same either way.
        """
        graphdef = nnx.graphdef(self.blocks[0])
        states = [nnx.to_pure_dict(nnx.state(block)) for block in self.blocks]

        def apply(state, x, key):
            return nnx.merge(graphdef, state)(x, positions, key, mask=mask)[0]

        if self.cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[self.cfg.remat])
        if not self.cfg.scan_layers:
            for i, state in enumerate(states):
                x = apply(state, x, _layer_key(dropout_key, i))
            return x
        stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)
        keys = None if dropout_key is None else jax.vmap(lambda i: _layer_key(dropout_key, i))(
            jnp.arange(len(states)))
        x, _ = jax.lax.scan(lambda x, layer: (apply(layer[0], x, layer[1]), None), x, (stacked, keys))
        return x


def segment_positions_and_mask(segment_ids: jax.Array | None,
                               shape: tuple[int, int]) -> tuple[jax.Array, jax.Array | None]:
    """Positions (B, T) and the attention mask (B, 1, T, T) of packed rows: a token's
    position counts from the first token of its document, and it sees only its own
    document's tokens. Without segment ids: positions 0..T-1 and no mask."""
    index = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    if segment_ids is None:
        return index, None
    starts_here = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                   segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    document_start = jax.lax.cummax(jnp.where(starts_here, index, 0), axis=1)
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    return index - document_start, same_document[:, None]


def _layer_key(dropout_key: jax.Array | None, layer: int | jax.Array) -> jax.Array | None:
    return None if dropout_key is None else jax.random.fold_in(dropout_key, layer)
