"""`jaxtrain data prepare`: text files -> tokenize once -> a token store (token_store.py).

    inputs (paths, directories, globs; "{stdlib}" = the Python standard library)
      -> documents, split train/val by the hash of their relative path (corpus.py)
      -> tokenizer: bytes, a BPE trained here on the training documents, or a given file
      -> token ids, each document ended by the end-of-document token
      -> tensorstore arrays + document index + metadata, written atomically (store_writer.py)

Files are read, tokenized and written in batches of documents (at most 256 or 2 MiB), so
memory stays bounded by one batch and one shard per split whatever the corpus size
(training a BPE reads the training files once more, first, and holds its word counts). The `tokenizers` library encodes each batch on every
core. The metadata keeps the tokenizer, vocabulary, token dtype, per-split counts,
inputs, unigram entropy and a content hash of the tokens.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxtrain.config.errors import DataError
from jaxtrain.data.corpus import check_split, entropy_of_counts, iter_documents
from jaxtrain.data.files import describe_skipped, list_files
from jaxtrain.data.staging import prepare_target
from jaxtrain.data.store_writer import StoreWriter
from jaxtrain.data.token_store import SPLITS
from jaxtrain.data.tokenizer import Tokenizer, describe, token_dtype, tokenizer_from_flag

# Documents encoded together: up to this many, or this many bytes (the `tokenizers`
# library holds ~100 bytes of offsets and attributes per token until a batch is done).
_BATCH_DOCUMENTS, _BATCH_BYTES = 256, 1 << 21


def _batches(documents: Iterator[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += len(document[1])
        if len(batch) == _BATCH_DOCUMENTS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_documents(store: StoreWriter, tokenizer: Tokenizer, documents, dtype: str) -> dict:
    """Tokenize and append every document to its split; returns the split writers."""
    writers = {name: store.split(name, dtype, tokenizer.vocab_size) for name in SPLITS}
    eos = np.array([tokenizer.eos_id])
    for batch in _batches(documents):
        encoded = tokenizer.encode_documents([data for _, data in batch])
        for (name, data), tokens in zip(batch, encoded):
            writers[name].add(np.concatenate([tokens, eos]), len(data))
    return writers


def prepare(inputs: list[str], out: str, tokenizer_flag: str = "byte", val_fraction: float = 0.05,
            name: str | None = None, dtype_flag: str = "auto") -> dict:
    """Prepare a dataset at `out`; returns its metadata. Bad input raises DataError and
    leaves nothing at `out`."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    out_path = Path(out).expanduser()
    prepare_target(out_path.absolute())  # an existing dataset, or a live prepare of it, is refused before any work
    listed = list_files(tuple(inputs), key="--input")
    files = listed.files
    training = (data for split, data in iter_documents(files, val_fraction) if split == "train")
    tokenizer = tokenizer_from_flag(tokenizer_flag, training)
    dtype = token_dtype(tokenizer.vocab_size, dtype_flag)
    with StoreWriter(out_path) as store:
        writers = _write_documents(store, tokenizer, iter_documents(files, val_fraction), dtype)
        splits = {name: writer.close() for name, writer in writers.items()}
        check_split("--input", len(files), splits["train"]["documents"], splits["val"]["documents"], val_fraction)
        digest = hashlib.sha256(b"".join(writers[n].digest.digest() for n in SPLITS)).hexdigest()
        return store.commit({
            "name": name or out_path.name, "tokenizer": describe(tokenizer, tokenizer_flag), "token_dtype": dtype,
            "val_fraction": val_fraction,
            "inputs": list(inputs), "files": len(files), "skipped": listed.skipped(), "splits": splits,
            "content_sha256": digest,
            "unigram_entropy": entropy_of_counts(writers["train"].counts),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }, tokenizer)


def summary(metadata: dict, out: str) -> str:
    s, t = metadata["splits"], metadata["tokenizer"]
    skipped = describe_skipped(metadata.get("skipped", {}))
    return (f"prepared {out}: {t['spec']} tokens (vocab {t['vocab_size']}, {metadata['token_dtype']}); "
            f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} documents, "
            f"val {s['val']['tokens']:,} / {s['val']['documents']}; "
            f"{s['train']['tokens'] / max(s['train']['bytes'], 1):.3f} tokens per byte"
            + (f"; skipped: {skipped}" if skipped else ""))
