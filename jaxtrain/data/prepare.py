"""`jaxtrain data prepare`: text files -> tokenize once -> a token store (token_store.py).

    inputs (paths, directories, globs; "{stdlib}" = the Python standard library)
      -> documents, split train/val by the hash of their relative path (corpus.py)
      -> tokenizer: bytes, a BPE trained here on the training documents, or a given file
      -> token ids, each document ended by the end-of-document token
      -> tensorstore arrays + document index + metadata, written atomically

The whole corpus is tokenized in memory (the `tokenizers` library encodes batches on every
core); that suits corpora of a few GB. Each input file is hashed, and the metadata keeps
the tokenizer, vocabulary, token dtype, per-split counts, sources and a content hash.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import numpy as np

from jaxtrain.data import token_store
from jaxtrain.data.corpus import read_documents, tokenize, unigram_entropy
from jaxtrain.data.token_store import SplitData
from jaxtrain.data.tokenizer import TOKEN_DTYPES, token_dtype, tokenizer_from_flag
from jaxtrain.errors import DataError


def prepare(inputs: list[str], out: str, tokenizer_flag: str = "byte", val_fraction: float = 0.05,
            name: str | None = None, dtype_flag: str = "auto") -> dict:
    """Prepare a dataset at `out`; returns its metadata. Bad input raises DataError
    before anything is written."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    out_path = Path(out).expanduser()
    token_store.prepare_target(out_path.absolute())  # refuse an existing dataset early
    docs = read_documents(tuple(inputs), val_fraction, key="--input")
    tokenizer = tokenizer_from_flag(tokenizer_flag, docs.train)
    dtype = token_dtype(tokenizer.vocab_size, dtype_flag)
    splits = {}
    for split, documents in (("train", docs.train), ("val", docs.val)):
        tokens, starts = tokenize(tokenizer, documents, np.int64)
        if tokens.size and tokens.max() >= tokenizer.vocab_size:
            raise DataError(f"--tokenizer {tokenizer_flag}: produced id {tokens.max()} outside its vocabulary "
                            f"of {tokenizer.vocab_size}")
        splits[split] = SplitData(tokens.astype(TOKEN_DTYPES[dtype]), starts, sum(len(d) for d in documents))
    info = {"kind": tokenizer.kind, "spec": tokenizer_flag, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id}
    if tokenizer.kind == "bpe":
        info["sha256"] = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()
    metadata = {
        "name": name or out_path.name, "tokenizer": info, "token_dtype": dtype, "val_fraction": val_fraction,
        "inputs": list(inputs), "files": docs.files,
        "unigram_entropy": unigram_entropy(splits["train"].tokens, tokenizer.vocab_size),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return token_store.write_store(out_path, splits, metadata, tokenizer)


def summary(metadata: dict, out: str) -> str:
    s, t = metadata["splits"], metadata["tokenizer"]
    return (f"prepared {out}: {t['spec']} tokens (vocab {t['vocab_size']}, {metadata['token_dtype']}); "
            f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} documents, "
            f"val {s['val']['tokens']:,} / {s['val']['documents']}; "
            f"{s['train']['tokens'] / max(s['train']['bytes'], 1):.3f} tokens per byte")
