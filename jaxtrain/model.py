"""Decoder-only transformer LM in Flax NNX.

token embedding -> n_layers x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

* RoPE on queries and keys (Su et al. 2021, "RoFormer"), half-split rotation.
* Causal multi-head attention with grouped-query option (Ainslie et al. 2023): n_kv_heads
  key/value heads shared by n_heads/n_kv_heads query heads each.
* Optional QK-norm: RMSNorm over head_dim on q and k before the dot product
  (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities").
* SwiGLU MLP (Shazeer 2020): down(silu(x W_gate) * (x W_up)).
* Untied LM head; logits are returned in float32 whatever the compute dtype.

Every parameter is created with logical axis names (`out_sharding` metadata):
  vocab, embed (the model width), heads, kv_heads, head_dim, mlp.
`sharding.py` maps them to mesh axes; the parametrization will read which of them grow
with width. Eager sharding is off: placement is decided once, by `sharding.py`.

Initialization is the standard parametrization: matrices N(0, 1/fan_in), embedding
N(0, 1), norm gains 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _fan_in_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], n_in: int) -> nnx.Param:
    """A matrix whose first `n_in` dims are contracted: std = 1/sqrt(fan_in)."""
    fan_in = math.prod(shape[:n_in])
    return _param(rngs, shape, axes, 1.0 / math.sqrt(fan_in))


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


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = _fan_in_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), 1)
        self.wk = _fan_in_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wv = _fan_in_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        self.wo = _fan_in_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), 2)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, "head_dim", cfg.norm_eps)
            self.k_norm = RMSNorm(h, "head_dim", cfg.norm_eps)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(dtype))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(cfg.head_dim))
        return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dtype))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ff_dim
        self.w_gate = _fan_in_param(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_up = _fan_in_param(rngs, (d, f), ("embed", "mlp"), 1)
        self.w_down = _fan_in_param(rngs, (f, d), ("mlp", "embed"), 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jax.nn.silu(x @ self.w_gate[...].astype(dtype))
        return (gate * (x @ self.w_up[...].astype(dtype))) @ self.w_down[...].astype(dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout
        self.attn_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, key: jax.Array | None) -> jax.Array:
        keys = jax.random.split(key) if key is not None else (None, None)
        x = x + dropout(self.attn(self.attn_norm(x), positions), self.dropout_rate, keys[0])
        return x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.lm_head = _fan_in_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 1)

    def __call__(self, tokens: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """tokens: (B, T) int -> logits (B, T, vocab) float32."""
        dtype = _DTYPES[self.cfg.dtype]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        for i, block in enumerate(self.blocks):
            key = jax.random.fold_in(dropout_key, i) if dropout_key is not None else None
            x = block(x, positions, key)
        x = self.final_norm(x)
        return jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(dtype),
                          preferred_element_type=jnp.float32)
