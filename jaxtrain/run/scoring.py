"""Log-likelihoods of token sequences under a model: what evaluation tasks score with
(jaxtrain/run/tasks.py, in the loop and in `jaxtrain eval --tasks`) and what an
lm-evaluation-harness model type can call.

    scorer = Scorer(spec, mesh, seq_len=256, batch_size=32)
    scorer.continuations(params, [(context_ids, continuation_ids), ...]) -> [(ll, greedy), ...]
    scorer.rolling(params, [document_ids, ...], prefix_id=eos) -> [ll, ...]

Both follow lm-evaluation-harness's HFLM (lm_eval/models/huggingface.py) to the token:

* a continuation request scores the input (context + continuation)[-(seq_len + 1):][:-1]
  and sums log p of the last len(continuation) targets; `greedy` is whether every one of
  them is the argmax of its logits (HFLM's `max_equal`);
* a document's rolling log-likelihood is the sum over the windows of
  lm_eval.utils.get_rolling_token_windows(tokens, prefix_token, max_seq_len=seq_len,
  context_len=1), each made disjoint (make_disjoint_window), every window scored as a
  continuation request. `rolling_windows` below is that windowing, written out here (the
  training core does not import lm_eval); tests/test_scoring.py checks it against lm_eval's.

Execution: one jitted forward per Scorer, on fixed-shape (batch_size, seq_len) int32 rows,
params in their storage shardings and rows over the mesh's batch axes (data x fsdp x expert) like
step.compile_eval, through the same bound model as training (step.bind_model). Requests
are packed several to a row, longest first, each its own segment (the segment ids the
model takes for packed documents: a request attends only to itself and its positions start
at 0, as if it were alone in a row); the rest of a row and whole padding rows are a segment
whose outputs are never read. Log-probabilities are float32 (log-softmax of the float32
logits), summed per request in float64.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.model import sharding


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_seq_len: int,
                    context_len: int = 1) -> Iterator[tuple[list[int], list[int]]]:
    """lm_eval.utils.get_rolling_token_windows: (input tokens, predicted tokens) windows
    covering every token of `tokens` once; the first conditions on `prefix_id`, each later
    one on up to max_seq_len - window length tokens before it. Score only the last
    len(predicted) positions of each input."""
    tokens = list(tokens)
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"context_len {context_len} is not in [1, {max_seq_len}]")
    if not tokens:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    yield [prefix_id] + tokens[:first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        window = min(len(tokens) - predicted, pred_len)
        end = predicted + window
        yield tokens[end - max_seq_len - 1:end - 1], tokens[end - window:end]
        predicted += window


def disjoint(window: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm_eval.utils.make_disjoint_window: the context without the tokens it shares with
    the continuation, so that context + continuation is the window's whole sequence."""
    context, continuation = window
    return context[:len(context) - (len(continuation) - 1)], continuation


def _score_rows(params: Any, inputs: jax.Array, targets: jax.Array, segments: jax.Array, *,
                spec: ts.ModelSpec) -> tuple[jax.Array, jax.Array]:
    """(B, T) rows -> (log p(target) float32, target == argmax) per position."""
    logits = ts.bind_model(spec, params)(inputs, segment_ids=segments).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - log_z, jnp.argmax(logits, axis=-1) == targets


class Scorer:
    """Sums of log p over chosen target positions of many short sequences, batched."""

    def __init__(self, spec: ts.ModelSpec, mesh: Mesh, seq_len: int, batch_size: int):
        shards = sharding.batch_shards(mesh.shape)
        if batch_size < 1 or batch_size % shards:
            raise ConfigError("eval.batch_size",
                              f"{batch_size} is not a positive multiple of data*fsdp*expert = {shards}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self._rows = sharding.batch_sharding(mesh)
        params = sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh)
        rep = sharding.replicated(mesh)
        self._forward = jax.jit(sharding.traced_on(mesh, functools.partial(_score_rows, spec=spec)),
                                in_shardings=(params, self._rows, self._rows, self._rows),
                                out_shardings=(rep, rep))

    def continuations(self, params: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log p(continuation | context), whether every
        continuation token is the greedy one), in the order given."""
        pieces = []
        for i, (context, continuation) in enumerate(requests):
            context, continuation = [int(t) for t in context], [int(t) for t in continuation]
            if not context:
                raise ValueError(f"request {i}: empty context (give the prefix token, e.g. end-of-document)")
            if not 1 <= len(continuation) <= self.seq_len:
                raise ValueError(f"request {i}: continuation of {len(continuation)} tokens, "
                                 f"not in [1, seq_len = {self.seq_len}]")
            whole = (context + continuation)[-(self.seq_len + 1):]
            pieces.append((whole, len(continuation)))
        return self._score(params, pieces)

    def rolling(self, params: Any, documents: Sequence[Sequence[int]], prefix_id: int) -> list[float]:
        """Total log-likelihood of every token of each document (lm-eval's
        loglikelihood_rolling; an empty document scores 0)."""
        owners, requests = [], []
        for d, tokens in enumerate(documents):
            for window in rolling_windows([int(t) for t in tokens], prefix_id, self.seq_len):
                owners.append(d)
                requests.append(disjoint(window))
        totals = np.zeros(len(documents))
        for d, (ll, _) in zip(owners, self.continuations(params, requests), strict=True):
            totals[d] += ll
        return [float(t) for t in totals]

    def _score(self, params: Any, pieces: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """pieces: (sequence of up to seq_len + 1 tokens, how many last targets to score)."""
        placed = _pack([len(whole) - 1 for whole, _ in pieces], self.seq_len)  # (row, offset) per piece
        n_rows = max((row for row, _ in placed), default=-1) + 1
        n_rows = -(-n_rows // self.batch_size) * self.batch_size
        shape = (n_rows, self.seq_len)
        inputs, targets, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        for i, ((whole, _), (row, offset)) in enumerate(zip(pieces, placed)):
            span = slice(offset, offset + len(whole) - 1)
            inputs[row, span], targets[row, span], segments[row, span] = whole[:-1], whole[1:], i + 1
        logp, greedy = np.zeros(shape, np.float32), np.zeros(shape, bool)
        for start in range(0, n_rows, self.batch_size):
            rows = slice(start, start + self.batch_size)
            out = self._forward(params, *(self._global(a[rows]) for a in (inputs, targets, segments)))
            logp[rows], greedy[rows] = (np.asarray(o.addressable_data(0)) for o in out)
        results = []
        for (whole, n), (row, offset) in zip(pieces, placed):
            span = slice(offset + len(whole) - 1 - n, offset + len(whole) - 1)
            results.append((float(np.sum(logp[row, span], dtype=np.float64)), bool(np.all(greedy[row, span]))))
        return results

    def _global(self, rows: np.ndarray) -> jax.Array:
        """A (batch_size, seq_len) array every process holds whole -> the batch-sharded array."""
        return jax.make_array_from_callback(rows.shape, self._rows, lambda index: rows[index])


def _pack(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each sequence, first-fit over the sequences longest first: every row
    holds at most `capacity` positions, and a sequence never spans two rows."""
    free: list[int] = []  # positions left in each row
    placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    full = 0  # rows before this one are full (the first sequences, longest, often fill a row)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        while full < len(free) and free[full] == 0:
            full += 1
        row = next((r for r in range(full, len(free)) if free[r] >= lengths[i]), None)
        if row is None:
            row = len(free)
            free.append(capacity)
        placed[i] = (row, capacity - free[row])
        free[row] -= lengths[i]
    return placed
