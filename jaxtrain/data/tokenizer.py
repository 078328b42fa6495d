"""Tokenizers of prepared datasets: raw bytes, or byte-level BPE trained locally.

Both map a document (bytes) to token ids and end it with the end-of-document token, so a
prepared dataset is the documents' tokens joined end to end.

* `byte`: the UTF-8 bytes themselves (vocabulary 256); the end-of-document token is byte 0
  (NUL), which text files do not contain (binary files are refused when preparing).
* `bpe:VOCAB`: byte-level BPE (Sennrich et al. 2016; GPT-2's byte-to-unicode pre-tokenizer,
  so every string encodes) trained with the `tokenizers` library on the training split
  only (past `--tokenizer-sample` bytes, on a sample of it: sample.py), with
  `<|endoftext|>` as id 0. Saved as `tokenizer.json` beside the data.
* `PATH/tokenizer.json`: an existing `tokenizers` file, used as is; it must define an
  end-of-document token (`<|endoftext|>`, `</s>`, `<eos>` or `<|end_of_text|>`).

Nothing is downloaded: training and loading read only local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Iterator, Protocol

import numpy as np

from jaxtrain.config.errors import DataError

BYTE_VOCAB = 256
END_OF_TEXT = "<|endoftext|>"
_EOS_CANDIDATES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")
TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}
_PIECE_BYTES = 1 << 16
_CUT = re.compile(rb"(?<=[^\s]) ")  # a space after a non-space character


class Tokenizer(Protocol):
    kind: str  # "byte" or "bpe"
    vocab_size: int
    eos_id: int

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]: ...

    def decode(self, tokens: Iterable[int]) -> str: ...


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One text (a prompt) -> its int32 token ids, without an end token."""
    return tokenizer.encode_documents([text.encode("utf-8")])[0].astype(np.int32)


class ByteTokenizer:
    kind, vocab_size, eos_id = "byte", BYTE_VOCAB, 0

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(doc, np.uint8) for doc in documents]

    def decode(self, tokens: Iterable[int]) -> str:
        """Ids outside the byte range and invalid UTF-8 become U+FFFD."""
        return bytes(int(t) if 0 <= int(t) < BYTE_VOCAB else 0xFF for t in tokens).decode("utf-8", errors="replace")


class BpeTokenizer:
    """A `tokenizers.Tokenizer` with its end-of-document id."""

    kind = "bpe"

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source
        self.vocab_size = tokenizer.get_vocab_size()
        ids = [tokenizer.token_to_id(t) for t in _EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(f"{source}: the tokenizer has no end-of-document token (one of {', '.join(_EOS_CANDIDATES)})")
        self.eos_id = found[0]
        pre = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
        # GPT-2 style byte-level pre-tokenization (no prefix space) always ends a pre-token
        # before a space that follows a non-space character, so a document cut there
        # encodes to the same ids as a whole
        self._cuttable = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", True)

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        """Batched encoding: the `tokenizers` library spreads it over all cores. Documents
        longer than 64 KiB are encoded in pieces (`_pieces`; the library holds
        ~400 bytes per token of a text while encoding it)."""
        pieces = [self._pieces(doc) for doc in documents]
        ids = iter(self._encode_in_groups([p for doc_pieces in pieces for p in doc_pieces]))
        return [np.concatenate([np.asarray(next(ids), np.int64) for _ in doc_pieces]) for doc_pieces in pieces]

    def _encode_in_groups(self, pieces: list[bytes]) -> Iterator[list[int]]:
        """encode_batch over groups of at most ~512 KiB of text, so memory stays bounded."""
        group, size = [], 0
        for piece in pieces + [None]:
            if group and (piece is None or size + len(piece) > 8 * _PIECE_BYTES):
                texts = [g.decode("utf-8", errors="replace") for g in group]
                yield from (e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False))
                group, size = [], 0
            if piece is not None:
                group.append(piece)
                size += len(piece)

    def _pieces(self, doc: bytes) -> list[bytes]:
        """The document cut into pieces of at least 32 KiB, each cut before a space that
        follows a non-space character (see __init__)."""
        if not self._cuttable or len(doc) <= _PIECE_BYTES:
            return [doc]
        pieces, start = [], 0
        while len(doc) - start > _PIECE_BYTES:
            match = _CUT.search(doc, start + _PIECE_BYTES // 2)
            if match is None:
                break  # no cut point left: the rest is encoded whole
            pieces.append(doc[start:match.start()])
            start = match.start()
        return pieces + [doc[start:]]

    def decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)

    def save(self, path: str) -> None:
        self.tokenizer.save(path)


def train_bpe(documents: Iterable[bytes], vocab_size: int) -> BpeTokenizer:
    """Byte-level BPE with `vocab_size` ids (id 0 = end of document) learnt from `documents`."""
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= BYTE_VOCAB:
        raise DataError(f"--tokenizer bpe:{vocab_size}: a byte-level BPE needs more than {BYTE_VOCAB} ids")
    tokenizer = HfTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((doc.decode("utf-8", errors="replace") for doc in documents), trainer,
                                  length=len(documents) if isinstance(documents, list) else None)
    return BpeTokenizer(tokenizer, f"bpe:{vocab_size}")


def load_tokenizer_file(path: str) -> BpeTokenizer:
    from tokenizers import Tokenizer as HfTokenizer

    if not os.path.isfile(path):
        raise DataError(f"--tokenizer {path}: no such file")
    try:
        return BpeTokenizer(HfTokenizer.from_file(path), path)
    except Exception as err:  # the library raises plain Exceptions for malformed files
        raise DataError(f"--tokenizer {path}: not a tokenizers JSON file ({str(err).splitlines()[0]})") from None


def tokenizer_from_flag(flag: str, training_documents: Iterable[bytes]) -> Tokenizer:
    """`byte`, `bpe:VOCAB` (trained on `training_documents`) or a tokenizer.json path."""
    if flag == "byte":
        return ByteTokenizer()
    if flag.startswith("bpe:"):
        try:
            vocab = int(flag[4:])
        except ValueError:
            raise DataError(f"--tokenizer {flag}: expected bpe:VOCAB with an integer VOCAB, e.g. bpe:8192") from None
        return train_bpe(training_documents, vocab)
    return load_tokenizer_file(flag)


def open_saved(kind: str, directory: str) -> Tokenizer:
    """The tokenizer a prepared dataset was made with (metadata `tokenizer.kind`)."""
    return ByteTokenizer() if kind == "byte" else load_tokenizer_file(os.path.join(directory, "tokenizer.json"))


def describe(tokenizer: Tokenizer, spec: str) -> dict:
    """What a dataset's metadata records of its tokenizer; (kind, vocab_size, sha256) is
    its identity, which the sources of one mixture must share."""
    info = {"kind": tokenizer.kind, "spec": spec, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    if tokenizer.kind == "bpe":
        info["sha256"] = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()
    return info


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The smallest unsigned dtype holding every id, or the requested one if it does."""
    if requested == "auto":
        return next(name for name, dt in TOKEN_DTYPES.items() if vocab_size - 1 <= np.iinfo(dt).max)
    if requested not in TOKEN_DTYPES:
        raise DataError(f"--token-dtype {requested}: expected auto, {', '.join(TOKEN_DTYPES)}")
    if vocab_size - 1 > np.iinfo(TOKEN_DTYPES[requested]).max:
        raise DataError(f"--token-dtype {requested}: the tokenizer's vocabulary of {vocab_size} ids does not fit "
                        f"(largest {requested} is {np.iinfo(TOKEN_DTYPES[requested]).max})")
    return requested
