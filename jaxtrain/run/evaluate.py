"""Validation loss: the fixed validation batches, and the evaluator the training loop calls
(`jaxtrain eval` on a saved checkpoint is tools/evaluate_checkpoint.py).

The validation set of each data source is the first `data.val_batches` batches of
consecutive windows of its validation split (`pipeline.validation_batches`), the same at
every evaluation, so `jaxtrain eval WORKDIR --step N` reproduces the `val_loss` logged at
step N.

Reported quantities, with loss in nats per token (mean next-token cross-entropy, no z-loss):
    val_loss/<source>  each source's loss (logged when there are several)
    val_loss           the sources' losses averaged with their data.sources weights
    perplexity         exp(val_loss)
    bits per byte      loss / ln 2 * tokens / bytes, with the source's validation split's
                       tokens per UTF-8 byte (1 + documents/bytes for byte tokens; BPE ~0.3),
                       so runs with different tokenizers compare
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain import step as ts
from jaxtrain.config.schema import Config
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource
from jaxtrain.model import sharding


def validation_set(cfg: Config, source: DataSource, mesh: Mesh) -> list:
    """A source's validation batches as global arrays; each process supplies its own rows."""
    batch_sharding = sharding.batch_sharding(mesh)
    local = pipeline.validation_batches(cfg, source, *sharding.process_rows(mesh, cfg.train.batch_size))
    to_global = lambda b: jax.make_array_from_process_local_data(batch_sharding, b)
    return [jax.tree.map(to_global, b) for b in local]


class Evaluator:
    """params -> {"val_loss", "val_bits_per_byte"[, "val_loss/<source>" ...]} over the
    fixed validation batches of every source."""

    def __init__(self, evaluate: Callable, cfg: Config, sources: list[DataSource], mesh: Mesh):
        self.evaluate, self.sources = evaluate, sources
        self.batches = [validation_set(cfg, source, mesh) for source in sources]
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self._replicated = sharding.replicated(mesh)

    def predicted_tokens(self) -> int:
        """Targets the validation losses average over, every source together (under packing,
        not the targets that start a new document: the loss does not count them)."""
        count = jax.jit(lambda b: jnp.sum(ts.target_weights(b, jnp.int32)), out_shardings=self._replicated)
        return sum(int(count(b)) for batches in self.batches for b in batches)

    def __call__(self, params: Any) -> dict[str, float]:
        losses = [[self.evaluate(params, b) for b in batches] for batches in self.batches]
        per_source = [float(np.mean(jax.device_get(source_losses))) for source_losses in losses]
        result = {"val_loss": float(np.dot(self.weights, per_source)),
                  "val_bits_per_byte": float(np.dot(self.weights, [
                      loss / math.log(2) * s.val_tokens_per_byte for loss, s in zip(per_source, self.sources)]))}
        if len(self.sources) > 1:
            result.update({f"val_loss/{s.name}": loss for s, loss in zip(self.sources, per_source)})
        return result
