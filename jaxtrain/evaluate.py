"""Validation loss: the fixed validation batches, the evaluator the training loop calls,
and `jaxtrain eval` on any saved checkpoint.

The validation set is the first `data.val_batches` batches of consecutive windows of the
corpus's validation split (`pipeline.validation_batches`), the same at every evaluation,
so `jaxtrain eval WORKDIR --step N` reproduces the `val_loss` logged at step N.

Reported quantities, with loss in nats per token (mean next-token cross-entropy, no z-loss):
    perplexity    = exp(loss)
    bits per byte = loss / ln 2 * tokens / bytes    (tokens = bytes for the byte tokenizer)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrain import sharding
from jaxtrain import train_step as ts
from jaxtrain.config import Config
from jaxtrain.data import pipeline
from jaxtrain.data.corpus import Corpus, corpus_for
from jaxtrain.saved_run import SavedRun


def validation_set(cfg: Config, corpus: Corpus, mesh: Mesh) -> list[jax.Array]:
    """The validation batches as global arrays; each process supplies its own rows."""
    batch_sharding = sharding.batch_sharding(mesh)
    local = pipeline.validation_batches(cfg, corpus.val, jax.process_index(), jax.process_count())
    return [jax.make_array_from_process_local_data(batch_sharding, b) for b in local]


class Evaluator:
    """params -> mean validation loss (nats/token) over the fixed validation batches."""

    def __init__(self, evaluate: Callable, batches: list[jax.Array]):
        self.evaluate, self.batches = evaluate, batches

    def __call__(self, params: Any) -> float:
        losses = [self.evaluate(params, b) for b in self.batches]
        return float(np.mean(jax.device_get(losses)))


def evaluate_run(run: SavedRun, data_paths: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Validation metrics of a saved checkpoint, on the run's own data or on `data_paths`
    (text files or globs, split into train/validation by the same rule as `data.paths`)."""
    cfg = run.cfg
    if data_paths:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"paths": tuple(data_paths)})})
    sharding.check_batch_divides(cfg, run.mesh)
    param_shardings = jax.tree.map(lambda p: p.sharding, run.params)
    evaluate = jax.jit(functools.partial(ts.eval_step, spec=run.spec),
                       in_shardings=(param_shardings, sharding.batch_sharding(run.mesh)),
                       out_shardings=sharding.replicated(run.mesh))
    batches = validation_set(cfg, corpus_for(cfg.data), run.mesh)
    loss = Evaluator(evaluate, batches)(run.params)
    tokens = len(batches) * cfg.train.batch_size * cfg.data.seq_len
    return dataclasses.asdict(EvalReport(
        step=run.step, tokens_seen=run.tokens, val_loss=loss, perplexity=math.exp(loss),
        bits_per_byte=loss / math.log(2), val_tokens=tokens, data=list(cfg.data.paths)))


@dataclasses.dataclass(frozen=True)
class EvalReport:
    step: int
    tokens_seen: int  # training tokens of the checkpoint
    val_loss: float  # nats/token
    perplexity: float
    bits_per_byte: float  # byte tokenizer: one token per byte
    val_tokens: int  # predicted tokens the figures average over
    data: list[str]
