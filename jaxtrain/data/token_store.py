"""A prepared dataset on disk: token arrays in tensorstore (zarr v3), a document index, metadata.

    DIR/metadata.json           tokenizer, vocab size, token dtype, counts, sources, hashes
    DIR/tokenizer.json          the BPE tokenizer (absent for byte tokens)
    DIR/{train,val}/tokens      1-D token array: every document's tokens then its end token
    DIR/{train,val}/doc_starts  int64 offsets of each document's first token, plus the total

Tokens are stored as zarr v3 shards of 2^22 tokens holding inner chunks of 2^14 tokens
(zstd), so a random window reads one or two small chunks and a large corpus is a few
hundred files, not millions. Reads are issued asynchronously and gathered, a batch at a time.

Writing (store_writer.py) is atomic: everything goes into a hidden sibling directory that
is renamed into place; metadata.json, written last (itself tmp-then-rename), is what marks
a dataset as complete. A crash at any point leaves either nothing under DIR or a DIR
without metadata.json, which `open_store` refuses and the next `data prepare` replaces
(staging.py: who owns a staging directory, and when it may be cleared).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import tensorstore as ts

from jaxtrain.config.errors import DataError

FORMAT = "jaxtrain-token-store"
VERSION = 1
SPLITS = ("train", "val")
MARKER = ".jaxtrain-prepare"  # present in every directory `data prepare` writes
SHARD_TOKENS, _CHUNK = 1 << 22, 1 << 14
_CACHE_BYTES = 64 << 20  # decoded chunks kept per open array


def array_spec(path: Path, shape: int | None = None, dtype: str | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if shape is not None:
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]
        chunk = min(_CHUNK, max(shape, 1))
        shard = min(SHARD_TOKENS, -(-max(shape, 1) // chunk) * chunk)  # a whole number of chunks
        spec["metadata"] = {
            "shape": [shape], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [chunk], "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
    return spec


class TokenSplit:
    """Read access to one split: `read(starts, length)` -> (len(starts), length) int32 windows.
    The tokens are an open tensorstore array, or a numpy array (the in-memory text corpus)."""

    def __init__(self, tokens, doc_starts: np.ndarray, name: str):
        self._tokens, self.doc_starts, self.name = tokens, doc_starts, name
        self.num_tokens = int(tokens.shape[0])

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        if isinstance(self._tokens, np.ndarray):
            return np.stack([self._tokens[s:s + length] for s in starts]).astype(np.int32)
        reads = [self._tokens[int(s):int(s) + length].read() for s in starts]  # in flight together
        return np.stack([r.result() for r in reads]).astype(np.int32)

    def segment_ids(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) ids of the document each token belongs to, counted from 1
        within each row (the first token's document is 1)."""
        positions = np.asarray(starts)[:, None] + np.arange(length)[None, :]
        docs = np.searchsorted(self.doc_starts, positions, side="right")
        return (docs - docs[:, :1] + 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Store:
    path: Path
    metadata: dict
    train: TokenSplit
    val: TokenSplit

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["tokenizer"]["vocab_size"])

    def tokens_per_byte(self, split: str = "val") -> float:
        counts = self.metadata["splits"][split]
        return counts["tokens"] / max(counts["bytes"], 1)


def read_metadata(path: Path) -> dict:
    meta_path = path / "metadata.json"
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset directory (make one with `jaxtrain data prepare`)")
    if not meta_path.exists():
        hint = " (an interrupted `jaxtrain data prepare`: run it again)" if (path / MARKER).exists() else ""
        raise DataError(f"{path}: not a prepared dataset, it has no metadata.json{hint}")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: unreadable metadata ({err})") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise DataError(f"{meta_path}: not a {FORMAT} version {VERSION} dataset")
    return metadata


def open_store(path: str | os.PathLike) -> Store:
    """Open a prepared dataset for reading, checking that its arrays match its metadata."""
    path = Path(path).expanduser().absolute()
    metadata = read_metadata(path)
    context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
    splits = {}
    for name in SPLITS:
        try:
            tokens = ts.open(array_spec(path / name / "tokens"), read=True, context=context).result()
            doc_starts = ts.open(array_spec(path / name / "doc_starts"), read=True).result().read().result()
        except ValueError as err:
            raise DataError(f"{path / name}: unreadable token array ({str(err).splitlines()[0]})") from None
        expected = metadata["splits"][name]
        if tokens.shape[0] != expected["tokens"] or len(doc_starts) != expected["documents"] + 1:
            raise DataError(f"{path / name}: holds {tokens.shape[0]} tokens / {len(doc_starts) - 1} documents, "
                            f"metadata.json says {expected['tokens']} / {expected['documents']}")
        splits[name] = TokenSplit(tokens, np.asarray(doc_starts, np.int64), f"{path.name}/{name}")
    return Store(path, metadata, splits["train"], splits["val"])
