"""The reference that KV-cached sampling (jaxtrain/tools/generate.py) is held to: the same
sampling with no cache, re-running the whole model for every new token."""

import jax
import jax.numpy as jnp

from jaxtrain.model.transformer import Transformer
from jaxtrain.tools.generate import sample


def generate_by_recompute(model: Transformer, prompt: jax.Array, *, max_new_tokens: int,
                          temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> jax.Array:
    """The same sampling with no cache: every token re-runs the model on the whole
    sequence (padded to its final length, which causal attention ignores, so that it
    compiles once)."""
    key, start = jax.random.PRNGKey(seed), prompt.shape[1]
    sequence = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))
    logits_at = jax.jit(lambda model, tokens, position: model(tokens)[:, position])
    for index in range(max_new_tokens):
        logits = logits_at(model, sequence, start + index - 1)
        token = sample(logits, jax.random.fold_in(key, index), temperature, top_k)
        sequence = sequence.at[:, start + index].set(token)
    return sequence[:, start:]
