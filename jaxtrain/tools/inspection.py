"""Looking inside a saved run: what `notebooks/inspect.ipynb` shows, as plain functions.

    parameter_stats(run)          one row per parameter: role, layer, shape, RMS, the
                                  table's init std and multipliers, top singular value
    activation_stats(run, batch)  RMS of embeddings, each block's attention/MLP output, logits
    attention_maps(model, tokens) softmax attention probabilities, one (B, N, T, T) per layer
    sample_batch(run, n)          the first n validation windows of the run's data, packed
                                  ones with their segment ids

Everything runs on the devices the run was loaded onto (`saved_run.load_run`), and what
the model computes inside is what its own forward pass sows (`model.forward_sown`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.data import pipeline
from jaxtrain.data.sources import open_sources
from jaxtrain.model.parametrization import path_str
from jaxtrain.model.transformer import Transformer, forward_sown
from jaxtrain.run import telemetry
from jaxtrain.tools.coord_check import activation_rms
from jaxtrain.tools.saved_run import SavedRun

SV_ITERATIONS = 30  # power iterations per top singular value: a value to read, cheap for any run


def _layer(path: str) -> int | None:
    match = re.match(r"(?:dense_)?blocks\.(\d+)\.", path)
    return int(match.group(1)) if match else None


def parameter_stats(run: SavedRun) -> list[dict[str, Any]]:
    """Per parameter, and per layer of a stacked one (path blocks.I.* or dense_blocks.I.*, I
    the block's index in the model): path, role, layer (None outside the blocks), shape,
    RMS, and for matrices the top singular value of the weight the forward pass uses, as a
    fan-in x fan-out matrix (`telemetry.singular_values`)."""
    flat = jax.tree_util.tree_flatten_with_path(run.params)[0]
    sigma = jax.jit(lambda params: telemetry.singular_values(params, run.spec.table, SV_ITERATIONS))(run.params)
    rows = []
    for key_path, stacked in flat:
        rule = run.spec.table.rules[path_str(key_path)]
        layers = stacked.reshape(-1, *rule.shape)  # each layer's (and each expert's) slice
        for path, value in zip(run.spec.table.per_layer_paths(path_str(key_path)), layers, strict=True):
            row = {"path": path, "role": rule.role, "layer": _layer(path), "shape": tuple(value.shape),
                   "rms": float(jnp.sqrt(jnp.mean(jnp.square(value)))), "init_std": rule.init_std,
                   "multiplier": rule.multiplier, "lr_multiplier": rule.lr, "wd_multiplier": rule.weight_decay}
            if f"sv/{path}" in sigma:
                row["top_singular_value"] = float(sigma[f"sv/{path}"])
            rows.append(row)
    return rows


def sample_batch(run: SavedRun, n: int = 1) -> np.ndarray | dict[str, np.ndarray]:
    """The first n validation windows of the run's own (first) data source, as the step
    reads them: (n, seq_len + 1) tokens, or under data.packing {"tokens", "segment_ids"}
    (`train_step.batch_tokens` takes either apart)."""
    batch = pipeline.validation_batches(run.cfg, open_sources(run.cfg)[0])[0]
    return jax.tree.map(lambda rows: rows[:n], batch)


def activation_stats(run: SavedRun, batch: Any) -> dict[str, float]:
    """RMS of the embeddings, every block's attention/MLP outputs and the logits, on a batch
    (B, T + 1) of tokens (or a packed {"tokens", "segment_ids"} one) such as `sample_batch`'."""
    rms = jax.jit(lambda params, batch: activation_rms(params, batch, spec=run.spec))
    return {k: float(v) for k, v in rms(run.params, jax.tree.map(jnp.asarray, batch)).items()}


def attention_maps(model: Transformer, tokens: jax.Array, segment_ids: jax.Array | None = None) -> list[jax.Array]:
    """Attention probabilities of every layer, (B, N, T, T) each, for tokens (B, T) (with
    their segment ids when packed: no query then attends to another document)."""
    _, sown = forward_sown(model, tokens, ("attention_weights",), segment_ids)
    return list(sown["attention_weights"])
