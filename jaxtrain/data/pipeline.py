"""grain pipelines over token splits: the mixed, shuffled training stream and fixed validation sets.

Training: window i of a source is tokens[i*T : i*T + T + 1] of its training split
(T = seq_len; inputs and shifted targets come from one window). Each source's window
indices are globally shuffled with a seeded permutation that grain redraws every epoch
(seed data.seed + source index) and repeated forever; `mixture.py` decides which source
fills each slot of the run's stream. Global batch b is slots [b*B, (b+1)*B)
(B = train.batch_size); a process reads only its contiguous slice, rows
[p*B/P, (p+1)*B/P), the part of the global batch its devices hold: (p, P) come from the
batch sharding (`sharding.process_rows`; P = 1 where the batch is replicated across
processes). So the global batch (content and order) is the same for any number of
processes and any mesh. A batch's windows are read together (asynchronous tensorstore
reads, gathered), by `read_threads` grain threads ahead of the training loop.

Packing (`data.packing`): each row also carries segment ids, the row-relative number of
the document each token belongs to (`TokenSplit.segment_ids`); the model restarts
positions and attention at every document, and the loss skips the one target per
boundary that lies in the next document.

The iterator's state (`get_state()`: batches consumed, equal on every process, the batch
size, the slot the stream started at, and each source's windows read and epochs) is saved
in every checkpoint; restoring it yields exactly the batches an uninterrupted run would
see next, also with another process count. Restored with another batch size, the stream
continues at the next unread slot (`windows_before`), so a batch-size change mid-run
neither repeats nor skips data.

Validation: per source, the first `val_batches` full batches of consecutive windows of its
validation split, in order, the same at every evaluation.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import grain
import numpy as np

from jaxtrain.config.errors import DataError
from jaxtrain.config.schema import Config
from jaxtrain.data.mixture import Mixture, mixture_for
from jaxtrain.data.sources import DataSource
from jaxtrain.data.token_store import TokenSplit


def num_windows(split: TokenSplit, seq_len: int) -> int:
    return max((split.num_tokens - 1) // seq_len, 0)


def local_batch_size(cfg: Config, process_count: int) -> int:
    return cfg.train.batch_size // process_count


class ReadWindows:
    """A batch of (source, window) pairs -> tokens (B, T+1), with segment ids if packing."""

    def __init__(self, splits: list[TokenSplit], seq_len: int, packing: bool):
        self.splits, self.seq_len, self.packing = splits, seq_len, packing

    def __call__(self, pairs: tuple[np.ndarray, np.ndarray]):
        sources, windows = pairs
        tokens = np.empty((len(windows), self.seq_len + 1), np.int32)
        segments = np.empty_like(tokens) if self.packing else None
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            starts = windows[rows].astype(np.int64) * self.seq_len
            tokens[rows] = self.splits[s].read(starts, self.seq_len + 1)
            if self.packing:
                segments[rows] = self.splits[s].segment_ids(starts, self.seq_len + 1)
        return {"tokens": tokens, "segment_ids": segments} if self.packing else tokens


def _tag(source: int, window: int) -> tuple[int, int]:
    return source, window


def _train_windows(cfg: Config, source: DataSource, alone: bool) -> int:
    """Windows in the source's training split; a source alone must fill a batch."""
    n, need = num_windows(source.train, cfg.data.seq_len), cfg.train.batch_size if alone else 1
    if n < need:
        raise DataError(f"data source '{source.name}': training split has {source.train.num_tokens} tokens, fewer "
                        f"than {need} window(s) of data.seq_len+1={cfg.data.seq_len + 1}")
    return n


def _validation_batch_count(cfg: Config, source: DataSource) -> int:
    n_batches = min(cfg.data.val_batches, num_windows(source.val, cfg.data.seq_len) // cfg.train.batch_size)
    if n_batches == 0:
        raise DataError(f"data source '{source.name}': validation split has {source.val.num_tokens} tokens, fewer "
                        f"than one batch of {cfg.train.batch_size} windows of data.seq_len+1={cfg.data.seq_len + 1}")
    return n_batches


def check_fits(cfg: Config, sources: list[DataSource],
               splits: Sequence[str] = ("train", "validation")) -> None:
    """Every source has training windows and a validation batch at this seq_len and batch
    size, for the `splits` a command reads (checked before a run writes anything)."""
    for source in sources:
        if "train" in splits:
            _train_windows(cfg, source, alone=len(sources) == 1)
        if "validation" in splits:
            _validation_batch_count(cfg, source)


def _window_streams(cfg: Config, sources: list[DataSource]) -> list[grain.MapDataset]:
    streams = []
    for s, source in enumerate(sources):
        n = _train_windows(cfg, source, alone=len(sources) == 1)
        stream = grain.MapDataset.range(n).shuffle(seed=cfg.data.seed + s).repeat(None)
        streams.append(stream.map(functools.partial(_tag, s)))
    return streams


def train_dataset(cfg: Config, sources: list[DataSource], process_index: int, process_count: int,
                  windows_before: int = 0, mixture: Mixture | None = None) -> grain.MapDataset:
    """Batches of the mixed window stream from slot `windows_before` on."""
    mixture = mixture or mixture_for(cfg)
    slots = grain.MapDataset.select_from_datasets(_window_streams(cfg, sources), mixture)[windows_before:]
    local = slots.batch(local_batch_size(cfg, process_count), drop_remainder=True)
    # process p takes every P-th per-process batch, from p on: its rows of each global batch
    mine = local[process_index::process_count]
    return mine.map(ReadWindows([s.train for s in sources], cfg.data.seq_len, cfg.data.packing))


# Batches read ahead per reading thread: enough that one slow read (a cold page of the
# token store) hides behind the steps still queued, few enough to keep host memory small.
PREFETCH_PER_THREAD = 4


class TrainBatches:
    """This process's training batches: a grain iterator plus where its stream started, so
    that the position survives a change of batch size (module docstring). `warn` is told
    when a source goes past data.max_epochs."""

    def __init__(self, cfg: Config, sources: list[DataSource], process_index: int = 0, process_count: int = 1,
                 warn: Callable[[str], None] | None = None):
        self.cfg, self.sources, self._where = cfg, sources, (process_index, process_count)
        self.mixture = mixture_for(cfg)
        self.windows = [num_windows(s.train, cfg.data.seq_len) for s in sources]
        self._warn, self._warned = warn, [-1] * len(sources)  # last pass warned about
        self._start(0)

    def _start(self, windows_before: int, consumed: int = 0) -> None:
        ds = train_dataset(self.cfg, self.sources, *self._where, windows_before=windows_before, mixture=self.mixture)
        threads = self.cfg.data.read_threads
        options = grain.ReadOptions(num_threads=threads,
                                    prefetch_buffer_size=PREFETCH_PER_THREAD * max(threads, 1))
        self.windows_before, self._consumed = windows_before, consumed
        self._iterator = iter(ds.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        self._consumed += 1
        if self._warn is not None:
            self._check_epochs()
        return batch

    def _windows_read(self) -> list[int]:
        """Windows of each source read so far (all processes together)."""
        return self.mixture.windows_read(self.windows_before + self._consumed * self.cfg.train.batch_size)

    def epochs(self) -> list[float]:
        return [r / n for r, n in zip(self._windows_read(), self.windows)]

    def _check_epochs(self) -> None:
        """One warning per new pass over a source beyond data.max_epochs."""
        for s, epochs in enumerate(self.epochs()):
            if epochs > self.cfg.data.max_epochs and int(epochs) > self._warned[s]:
                self._warned[s] = int(epochs)
                self._warn(f"data source '{self.sources[s].name}' is on its pass {int(epochs) + 1} "
                           f"(epoch {epochs:.2f} > data.max_epochs={self.cfg.data.max_epochs:g})")

    def get_state(self) -> dict:
        read = self._windows_read()
        return {**self._iterator.get_state(), "windows_before": self.windows_before,
                "batch_size": self.cfg.train.batch_size,
                "sources": {s.name: {"windows_read": r, "epochs": r / n}
                            for s, r, n in zip(self.sources, read, self.windows)}}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        state.pop("sources", None)  # derived from the position, informative only
        before, batch_size = state.pop("windows_before", 0), state.pop("batch_size", self.cfg.train.batch_size)
        if batch_size == self.cfg.train.batch_size:
            self._start(before, state["next_index"])
            self._iterator.set_state(state)
        else:  # the old stream's next unread slot starts the new one
            self._start(before + state["next_index"] * batch_size)


def validation_batches(cfg: Config, source: DataSource, process_index: int = 0, process_count: int = 1) -> list:
    """The source's fixed validation batches (this process's rows)."""
    n_batches = _validation_batch_count(cfg, source)
    pairs = grain.MapDataset.range(n_batches * cfg.train.batch_size).map(functools.partial(_tag, 0))
    local = pairs.batch(local_batch_size(cfg, process_count), drop_remainder=True)[process_index::process_count]
    ds = local.map(ReadWindows([source.val], cfg.data.seq_len, cfg.data.packing))
    return [ds[i] for i in range(n_batches)]
