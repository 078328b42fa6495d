"""Writing a token store (format in token_store.py) as a stream, atomically.

    with StoreWriter(out) as store:
        train = store.split("train", "uint16")
        train.extend(tokens)                     # documents' tokens, each ended by its end token
        train.add_documents(lengths, n_bytes)    # where those documents end, and their bytes
        store.commit(metadata, tokenizer)        # the dataset exists from here on

Memory stays bounded by one shard: a split's tokens are buffered until a whole shard
(2^22 tokens) is full and then written once, so each shard file is written exactly once;
the array is created with room for 2^40 tokens and resized to its length at the end.

Atomicity: everything goes into a hidden sibling `.OUT.tmp-staging` that `commit` renames
to OUT; metadata.json, written last (tmp-then-rename), marks the dataset complete. The
sibling names and locks its writer (staging.py), so a second prepare of the same OUT
refuses while this one runs. Leaving the `with` block by an exception removes the
sibling; a killed process leaves it for the next `data prepare` of the same OUT to clear.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from pathlib import Path

import numpy as np
import tensorstore as ts

from jaxtrain.config.errors import DataError
from jaxtrain.data.staging import UNITS, claim, prepare_target, release
from jaxtrain.data.token_store import FORMAT, SHARD_TOKENS, VERSION, array_spec

_CAPACITY = 1 << 40  # tokens a split may hold; only written chunks take space


class SplitWriter:
    """Appends documents' tokens (each already ended by its end token) to one split."""

    def __init__(self, directory: Path, dtype: str, vocab_size: int):
        self._dir, self._dtype, self._vocab = directory, np.dtype(dtype), vocab_size
        self._tokens = ts.open(array_spec(directory / "tokens", _CAPACITY, dtype), create=True).result()
        self._pending: list[np.ndarray] = []
        self._pending_len = self._written = 0
        self._starts = array("q", [0])
        self.bytes = 0
        self.counts = np.zeros(vocab_size, np.int64)  # token histogram, for the unigram entropy
        self.digest = hashlib.sha256()

    def extend(self, tokens: np.ndarray) -> None:
        """Tokens of whole or partial documents; `add_documents` says where documents end."""
        if len(tokens) and int(tokens.max()) >= self._vocab:
            raise DataError(f"the tokenizer produced id {int(tokens.max())}, outside its vocabulary of {self._vocab}")
        self._pending.append(tokens.astype(self._dtype))
        self._pending_len += len(tokens)
        if self._pending_len >= SHARD_TOKENS:
            self._flush(final=False)

    def add_documents(self, lengths: np.ndarray, n_bytes: int) -> None:
        """The token lengths of the next documents (their tokens given to `extend`)."""
        self._starts.extend((self._starts[-1] + np.cumsum(lengths, dtype=np.int64)).tolist())
        self.bytes += n_bytes

    def _flush(self, final: bool) -> None:
        """Write the whole shards buffered (all of the buffer when `final`)."""
        buffer = np.concatenate(self._pending) if self._pending else np.zeros(0, self._dtype)
        cut = len(buffer) if final else len(buffer) // SHARD_TOKENS * SHARD_TOKENS
        if cut:
            self._tokens[self._written:self._written + cut].write(buffer[:cut]).result()
            self.counts += np.bincount(buffer[:cut], minlength=self._vocab)
            self.digest.update(buffer[:cut].tobytes())
            self._written += cut
        self._pending, self._pending_len = [buffer[cut:]], len(buffer) - cut

    def close(self) -> dict:
        self._flush(final=True)
        self._tokens.resize(exclusive_max=[self._written], resize_metadata_only=True).result()
        starts = np.frombuffer(self._starts, np.int64)
        doc_index = ts.open(array_spec(self._dir / "doc_starts", len(starts), "int64"), create=True).result()
        doc_index.write(starts).result()
        return {"tokens": self._written, "documents": len(starts) - 1, "bytes": self.bytes}


class StoreWriter:
    def __init__(self, out: Path):
        self.out = out.absolute()
        prepare_target(self.out)
        self.staging: Path | None = None
        self._lock = -1

    def __enter__(self) -> "StoreWriter":
        self.staging, self._lock = claim(self.out)
        return self

    def split(self, name: str, dtype: str, vocab_size: int) -> SplitWriter:
        return SplitWriter(self.staging / name, dtype, vocab_size)

    def commit(self, metadata: dict, tokenizer=None) -> dict:
        """Rename the finished dataset into place and mark it complete; returns its metadata."""
        if tokenizer is not None and tokenizer.kind == "bpe":
            tokenizer.save(str(self.staging / "tokenizer.json"))
        metadata = {"format": FORMAT, "version": VERSION, **metadata}
        shutil.rmtree(self.staging / UNITS, ignore_errors=True)  # the map's staged units, merged by now
        self.staging.rename(self.out)
        self.staging = None  # committed: nothing to remove on exit
        tmp = self.out / "metadata.json.tmp"
        tmp.write_text(json.dumps(metadata, indent=1))
        tmp.replace(self.out / "metadata.json")  # the dataset is complete from here on
        return metadata

    def __exit__(self, kind, err, traceback) -> None:
        release(self.staging, self._lock)  # uncommitted staging removed; the writer's lock ends here
        if err is None:
            return
        if isinstance(err, (OSError, ValueError)) and not isinstance(err, DataError):
            raise DataError(f"--out {self.out}: cannot write the dataset ({str(err).splitlines()[0][:200]})") from None
