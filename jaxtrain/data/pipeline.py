"""grain pipelines over a token array: shuffled training windows and a fixed validation set.

Training: window i is tokens[i*T : i*T + T + 1] (T = seq_len; inputs and shifted targets
come from one window). Window indices are globally shuffled with a seeded permutation that
grain redraws every epoch and repeated forever. Global batch b is windows [b*B, (b+1)*B)
of that stream (B = train.batch_size); process p of P reads only its contiguous slice,
rows [p*B/P, (p+1)*B/P), which is the part of the global batch its devices hold. So
hosts never read the same window, and the global batch (content and order) is the same
for any number of processes. The iterator's state (`get_state()`: the number of batches
consumed, equal on every process, the batch size and the window the stream started at) is
saved in every checkpoint; restoring it yields exactly the batches an uninterrupted run
would see next, also with another process count. Restored with another batch size, the
stream continues at the next unread window of the shuffled order (`windows_before`), so
a batch-size change mid-run neither repeats nor skips data.

Validation: the first `val_batches` full batches of consecutive windows of the validation
split, in order, the same at every evaluation.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxtrain.config import Config
from jaxtrain.errors import DataError


class Window:
    """Index -> (seq_len + 1,) int32 window of the token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __call__(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1].astype(np.int32)


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max((len(tokens) - 1) // seq_len, 0)


def local_batch_size(cfg: Config, process_count: int) -> int:
    return cfg.train.batch_size // process_count


def train_dataset(cfg: Config, tokens: np.ndarray, process_index: int, process_count: int,
                  windows_before: int = 0) -> grain.MapDataset:
    """Batches of the shuffled window stream from window `windows_before` on."""
    n = num_windows(tokens, cfg.data.seq_len)
    if n < cfg.train.batch_size:
        raise DataError(f"data.paths: training split has {len(tokens)} tokens, fewer than one batch of "
                        f"{cfg.train.batch_size} windows of data.seq_len+1={cfg.data.seq_len + 1}")
    ds = grain.MapDataset.range(n).shuffle(seed=cfg.data.seed).repeat(None)[windows_before:]
    return _process_slices(ds.map(Window(tokens, cfg.data.seq_len)), cfg, process_index, process_count)


def _process_slices(windows: grain.MapDataset, cfg: Config, process_index: int,
                    process_count: int) -> grain.MapDataset:
    """Batches of this process's rows of every global batch: the stream is cut into
    per-process batches, and process p takes every P-th one starting at p (lazily: the
    other processes' windows are never read)."""
    local = windows.batch(local_batch_size(cfg, process_count), drop_remainder=True)
    return local[process_index::process_count]


class TrainBatches:
    """This process's training batches: a grain iterator plus where its stream started, so
    that the position survives a change of batch size (module docstring)."""

    def __init__(self, cfg: Config, tokens: np.ndarray, process_index: int = 0, process_count: int = 1):
        self._args = (cfg, tokens, process_index, process_count)
        self._start(0)

    def _start(self, windows_before: int) -> None:
        cfg = self._args[0]
        ds = train_dataset(*self._args, windows_before=windows_before)
        options = grain.ReadOptions(num_threads=cfg.data.read_threads,
                                    prefetch_buffer_size=4 * max(cfg.data.read_threads, 1))
        self.windows_before, self._iterator = windows_before, iter(ds.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iterator)

    def get_state(self) -> dict:
        return {**self._iterator.get_state(), "windows_before": self.windows_before,
                "batch_size": self._args[0].train.batch_size}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        before, batch_size = state.pop("windows_before", 0), state.pop("batch_size", self._args[0].train.batch_size)
        if batch_size == self._args[0].train.batch_size:
            self._start(before)
            self._iterator.set_state(state)
        else:  # the old stream's next unread window starts the new one
            self._start(before + state["next_index"] * batch_size)


def train_iterator(cfg: Config, tokens: np.ndarray, process_index: int = 0, process_count: int = 1) -> TrainBatches:
    return TrainBatches(cfg, tokens, process_index, process_count)


def validation_batches(cfg: Config, tokens: np.ndarray, process_index: int = 0,
                       process_count: int = 1) -> list[np.ndarray]:
    n_batches = min(cfg.data.val_batches, num_windows(tokens, cfg.data.seq_len) // cfg.train.batch_size)
    if n_batches == 0:
        raise DataError(f"data.val_fraction: validation split has {len(tokens)} tokens, fewer than one "
                        f"batch of {cfg.train.batch_size} windows of {cfg.data.seq_len + 1}")
    windows = grain.MapDataset.range(n_batches * cfg.train.batch_size).map(Window(tokens, cfg.data.seq_len))
    ds = _process_slices(windows, cfg, process_index, process_count)
    return [ds[i] for i in range(n_batches)]
