"""Sampling text from a model, with a KV cache: `jaxtrain generate`.

    prefill   one `Transformer.decode` call over the prompt fills every layer's cache
    decode    then one token per step: the new token attends to the cached keys/values,
              so each step costs O(length) instead of re-running the whole sequence

The whole loop is one compiled function (`lax.scan` over the new tokens). Token i is
drawn with the key `fold_in(PRNGKey(seed), i)`, so a fixed seed gives the same text, and
the full forward pass over the growing sequence with no cache draws exactly the same
tokens (tests/reference_decoding.py, the reference the tests hold the cached path to).

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature),
restricted to the `top_k` most likely tokens when top_k > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtrain.model.transformer import Transformer


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """logits (B, V) float32 -> tokens (B,) int32."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate_cached(model: Transformer, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
                     temperature: float, top_k: int) -> jax.Array:
    caches = model.empty_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    logits, caches = model.decode(prompt, caches)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

    def step(carry, index):
        token, caches = carry
        logits, caches = model.decode(token[:, None], caches)
        following = sample(logits[:, -1], jax.random.fold_in(key, index), temperature, top_k)
        return (following, caches), token

    (last, _), tokens = jax.lax.scan(step, (first, caches), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: Transformer, prompt: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> jax.Array:
    """prompt (B, T) int32 -> (B, max_new_tokens) sampled continuations (KV-cached)."""
    return _generate_cached(model, prompt, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                            temperature=float(temperature), top_k=int(top_k))
