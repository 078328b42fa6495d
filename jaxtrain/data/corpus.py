"""Text corpora: files from globs, a document-level train/val split, token arrays.

Default corpus: the Python standard-library sources of the running interpreter
(`sysconfig.get_paths()["stdlib"]`, `**/*.py`, site-packages excluded), present on every
machine, so nothing is downloaded. Which files the inputs name (each once, directory links
not followed): files.py.

* A document is one file (or, for `data prepare`, one record of a record file: records.py).
  Split: a document goes to validation iff sha1(key) mod 10^6 < val_fraction * 10^6, the
  key being a file's relative path (a record's id, or FILE#ROW), so the split is
  deterministic, independent of file order and workers, and stable as files are added.
* Files that cannot be read, and binary files (a NUL byte in the first 8000 bytes, as git
  decides), are errors naming the file.
* Tokenized, a split is its documents' tokens each followed by the end-of-document token
  (byte 0 for byte tokens), plus the offsets where documents start.

`data.paths` runs read the corpus into memory with byte tokens at every start
(`load_corpus`, via sources.py); `jaxtrain data prepare` tokenizes it once into a token store.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Iterator

import numpy as np

from jaxtrain.config.errors import DataError
from jaxtrain.data.files import expand_paths
from jaxtrain.data.tokenizer import BYTE_VOCAB, ByteTokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class Documents:
    train: list[bytes]
    val: list[bytes]


def is_val(key: str, val_fraction: float) -> bool:
    """Does the document keyed `key` (a text file's relative path, or a record's id,
    records.py) go to validation?"""
    digest = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return digest % 1_000_000 < val_fraction * 1_000_000


def read_text_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    nul = data.find(b"\0", 0, 8000)
    if nul >= 0:
        raise DataError(f"{path}: binary file (NUL byte at offset {nul}); exclude it from the inputs")
    return data


def iter_documents(files: list[tuple[str, str]], val_fraction: float) -> Iterator[tuple[str, bytes]]:
    """("train" | "val", contents) of every non-empty file, read one at a time."""
    for root, path in files:
        data = read_text_file(path)
        if data:
            yield ("val" if is_val(os.path.relpath(path, root), val_fraction) else "train"), data


def validation_files(patterns: tuple[str, ...], val_fraction: float, key: str = "data.paths") -> list[str]:
    """The files of the patterns that the split holds out (validation), sorted by path."""
    return [path for root, path in expand_paths(patterns, key) if is_val(os.path.relpath(path, root), val_fraction)]


def check_split(key: str, n_files: int, n_train: int, n_val: int, val_fraction: float) -> None:
    if not n_train and not n_val:
        raise DataError(f"{key}: the {n_files} files matched are all empty")
    if not n_train or not n_val:
        raise DataError(f"{key}: corpus too small to split ({n_train} train, "
                        f"{n_val} validation documents at val_fraction={val_fraction})")


def read_documents(patterns: tuple[str, ...], val_fraction: float, key: str = "data.paths") -> Documents:
    """Every matched file in memory, split into training and validation documents."""
    files = expand_paths(patterns, key)
    split: dict[str, list[bytes]] = {"train": [], "val": []}
    for name, data in iter_documents(files, val_fraction):
        split[name].append(data)
    check_split(key, len(files), len(split["train"]), len(split["val"]), val_fraction)
    return Documents(split["train"], split["val"])


def join_documents(encoded: list[np.ndarray], eos_id: int, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_starts): each document's tokens then `eos_id`, end to end, and the
    offsets where documents start, plus the total length."""
    lengths = np.array([len(e) + 1 for e in encoded], np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.full(int(doc_starts[-1]), eos_id, dtype)
    for start, e in zip(doc_starts[:-1], encoded):
        tokens[start:start + len(e)] = e
    return tokens, doc_starts


def tokenize(tokenizer: Tokenizer, documents: list[bytes], dtype) -> tuple[np.ndarray, np.ndarray]:
    return join_documents(tokenizer.encode_documents(documents), tokenizer.eos_id, dtype)


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy (nats/token) of a token histogram: for the training tokens, the loss of the
    best model that ignores context, the baseline a language model must beat."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A `data.paths` corpus in memory, byte tokens."""

    train: np.ndarray  # uint8 tokens
    val: np.ndarray
    train_doc_starts: np.ndarray
    val_doc_starts: np.ndarray
    val_bytes: int

    @property
    def n_train_docs(self) -> int:
        return len(self.train_doc_starts) - 1

    @property
    def n_val_docs(self) -> int:
        return len(self.val_doc_starts) - 1

    def unigram_entropy(self) -> float:
        return entropy_of_counts(np.bincount(self.train, minlength=BYTE_VOCAB))


@functools.lru_cache(maxsize=4)
def load_corpus(paths: tuple[str, ...], val_fraction: float) -> TextCorpus:
    docs = read_documents(paths, val_fraction)
    train, train_starts = tokenize(ByteTokenizer(), docs.train, np.uint8)
    val, val_starts = tokenize(ByteTokenizer(), docs.val, np.uint8)
    return TextCorpus(train, val, train_starts, val_starts, sum(len(d) for d in docs.val))
