"""The data a run reads: `data.sources` (prepared token stores, mixed by weight) or, when
none are given, the `data.paths` text corpus read into memory with byte tokens.

Every source offers the same things to the pipeline: a training and a validation
`TokenSplit`, its vocabulary, its validation tokens per byte (for bits per byte) and the
unigram entropy of its training tokens. All sources of a run must share one tokenizer,
and the model's vocabulary must hold it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxtrain.config.errors import ConfigError, DataError
from jaxtrain.config.schema import Config, DataConfig
from jaxtrain.data import token_store
from jaxtrain.data.corpus import load_corpus
from jaxtrain.data.token_store import TokenSplit
from jaxtrain.data.tokenizer import BYTE_VOCAB, ByteTokenizer, Tokenizer, describe, open_saved


@dataclasses.dataclass(frozen=True)
class DataSource:
    name: str
    weight: float
    train: TokenSplit
    val: TokenSplit
    vocab_size: int
    tokenizer: dict  # kind, spec, vocab_size, eos_id (+ sha256 for BPE)
    val_tokens_per_byte: float
    unigram_entropy: float  # nats/token of the training split


def _text_source(cfg: DataConfig) -> DataSource:
    corpus = load_corpus(tuple(cfg.paths), cfg.val_fraction)
    return DataSource("text", 1.0, TokenSplit(corpus.train, corpus.train_doc_starts, "train"),
                      TokenSplit(corpus.val, corpus.val_doc_starts, "val"), BYTE_VOCAB,
                      describe(ByteTokenizer(), "byte"),
                      len(corpus.val) / max(corpus.val_bytes, 1), corpus.unigram_entropy())


def _prepared_source(path: str, name: str, weight: float) -> DataSource:
    store = token_store.open_store(path)
    meta = store.metadata
    return DataSource(name, weight, store.train, store.val, store.vocab_size, meta["tokenizer"],
                      store.tokens_per_byte("val"), float(meta["unigram_entropy"]))


def open_sources(cfg: Config) -> list[DataSource]:
    """The run's sources, checked against each other and against model.vocab_size."""
    data = cfg.data
    if not data.sources:
        sources = [_text_source(data)]
    else:
        sources = [_prepared_source(s.path, name, s.weight) for s, name in zip(data.sources, data.source_names())]
    first = sources[0]
    for other in sources[1:]:
        if _tokenizer_identity(other.tokenizer) != _tokenizer_identity(first.tokenizer):
            raise DataError(f"data.sources: '{other.name}' was tokenized with {other.tokenizer['spec']}, "
                            f"'{first.name}' with {first.tokenizer['spec']}; a mixture needs one tokenizer")
    if cfg.model.vocab_size < first.vocab_size:
        where = "the corpus" if not data.sources else f"dataset '{first.name}'"
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the vocabulary of {where} "
                                              f"({first.vocab_size} ids); set model.vocab_size={first.vocab_size}")
    return sources


def _tokenizer_identity(tokenizer: dict) -> tuple:
    return tokenizer["kind"], tokenizer["vocab_size"], tokenizer.get("sha256")


def run_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of a run's data (its first source's; all sources share it)."""
    if not cfg.data.sources:
        return ByteTokenizer()
    path = cfg.data.sources[0].path
    return open_saved(token_store.read_metadata(Path(path).expanduser().absolute())["tokenizer"]["kind"], path)
