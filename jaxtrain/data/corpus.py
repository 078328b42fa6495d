"""The text corpus: files from globs, byte-level tokens, a document-level train/val split.

Default corpus: the Python standard-library sources of the running interpreter
(`sysconfig.get_paths()["stdlib"]`, `**/*.py`, site-packages excluded), present on every
machine, so nothing is downloaded.

* Tokens are raw UTF-8 bytes (vocabulary 256). Documents are joined with byte 0 (NUL),
  which does not occur in text files, as the end-of-document separator.
* Split: a document goes to validation iff sha1(relative path) mod 10^6 < val_fraction * 10^6,
  so the split is deterministic, independent of file order, and stable as files are added.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

from jaxtrain.config import DataConfig
from jaxtrain.errors import DataError

DOC_SEPARATOR = 0
BYTE_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 tokens
    val: np.ndarray
    n_train_docs: int
    n_val_docs: int

    def unigram_entropy(self) -> float:
        """Entropy (nats/byte) of the training split's byte distribution: the loss of the
        best model that ignores context, the baseline a language model must beat."""
        counts = np.bincount(self.train, minlength=BYTE_VOCAB).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def expand_paths(patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """(root, file) pairs for every file matched; root makes paths relative for the split."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files: dict[str, str] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern.replace("{stdlib}", stdlib))
        root = expanded.split("*", 1)[0].rsplit(os.sep, 1)[0] if "*" in expanded else os.path.dirname(expanded)
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f"data.paths: no files match '{expanded}'")
        for path in matches:
            if os.path.isfile(path) and "site-packages" not in path.split(os.sep):
                files.setdefault(path, root)
    return [(root, path) for path, root in sorted(files.items())]


def _is_val(relative_path: str, val_fraction: float) -> bool:
    digest = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16)
    return digest % 1_000_000 < val_fraction * 1_000_000


def _join(docs: list[bytes]) -> np.ndarray:
    if not docs:
        return np.zeros(0, np.uint8)
    return np.frombuffer(bytes([DOC_SEPARATOR]).join(docs) + bytes([DOC_SEPARATOR]), np.uint8)


@functools.lru_cache(maxsize=4)
def load_corpus(paths: tuple[str, ...], val_fraction: float) -> Corpus:
    train_docs, val_docs = [], []
    for root, path in expand_paths(paths):
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror})") from None
        text = text.replace(bytes([DOC_SEPARATOR]), b"")
        if text:
            (val_docs if _is_val(os.path.relpath(path, root), val_fraction) else train_docs).append(text)
    if not train_docs or not val_docs:
        raise DataError(f"data.paths: corpus too small to split ({len(train_docs)} train, "
                        f"{len(val_docs)} validation documents at data.val_fraction={val_fraction})")
    return Corpus(_join(train_docs), _join(val_docs), len(train_docs), len(val_docs))


def encode(text: str) -> np.ndarray:
    """Text -> byte tokens (int32), as the corpus tokenizes it."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Byte tokens -> text; ids outside the byte range and invalid UTF-8 become U+FFFD."""
    return bytes(int(t) if 0 <= int(t) < BYTE_VOCAB else 0xFF for t in tokens).decode("utf-8", errors="replace")


def corpus_for(cfg: DataConfig) -> Corpus:
    return load_corpus(tuple(cfg.paths), cfg.val_fraction)
