"""`jaxtrain data prepare`: text and record files -> tokenize once -> a token store (token_store.py).

    inputs (paths, directories, globs; "{stdlib}" = the Python standard library)
      -> files (files.py) -> work units (plan.py): text-file groups, jsonl files, parquet
         row groups, Arrow files of a `datasets` save_to_disk
      -> tokenizer: bytes, a BPE trained here on the training documents (or on a
         deterministic sample of them past --tokenizer-sample bytes, sample.py), or a file
      -> map (units.py on engines.py: this process, a process pool, or Ray): each unit's
         records read (records.py), split train/val by the hash of their key (corpus.py),
         tokenized, each document ended by the end-of-document token, staged on disk
      -> ordered merge: units appended in plan order to the store's split writers
      -> tensorstore arrays + document index + metadata, committed atomically (store_writer.py)

The store is a function of the inputs and flags only: units are pure and merged in plan
order, so 1 worker, N workers and Ray write the same bytes, and a text-file corpus comes
out as it did before records and workers existed. Memory stays bounded whatever the corpus
size: a worker holds one batch of documents (at most 256 or 2 MiB), the merge one slice of
a unit's tokens and one shard per split; a BPE's training documents are held, up to
--tokenizer-sample bytes, with the trainer's word counts. Staged units survive a killed
prepare and are reused by the next one of the same plan (resume, staging.py).

Bad records (records.py) are counted per reason into the metadata's `skipped` and the
summary line, or with --strict the first one (in plan order) is a DataError and nothing is
written. The metadata keeps the tokenizer (and its sample), vocabulary, token dtype,
per-split counts, inputs, unigram entropy and a content hash of the tokens.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from collections import Counter
from pathlib import Path

from jaxtrain.config.errors import DataError
from jaxtrain.data.corpus import check_split, entropy_of_counts
from jaxtrain.data.engines import map_units, require
from jaxtrain.data.files import describe_skipped, list_files
from jaxtrain.data.plan import Unit, make_plan, plan_hash
from jaxtrain.data.records import BAD_REASONS, Fields
from jaxtrain.data.sample import DEFAULT_BUDGET, bottom_k, training_documents
from jaxtrain.data.staging import adopt_units, prepare_target
from jaxtrain.data.store_writer import StoreWriter
from jaxtrain.data.token_store import SPLITS
from jaxtrain.data.tokenizer import Tokenizer, describe, token_dtype, tokenizer_from_flag
from jaxtrain.data.units import Job, TokenizerSpec, clear_stale, read_lengths, read_tokens


def _merge(writers: dict, directory: str, info: dict, dtype: str) -> None:
    """Append one staged unit to the split writers, streaming its tokens."""
    for name in SPLITS:
        for tokens in read_tokens(directory, info["index"], name, dtype):
            writers[name].extend(tokens)
        writers[name].add_documents(read_lengths(directory, info["index"], name), info["splits"][name]["bytes"])


def _tokenizer(flag: str, units: list[Unit], fields: Fields, val_fraction: float, strict: bool,
               budget: int) -> tuple[Tokenizer, dict | None]:
    """The tokenizer, and for a BPE trained here what its sample holds."""
    sample: dict = {}

    def training():
        documents, held = bottom_k(training_documents(units, fields, val_fraction, strict), budget)
        sample.update(held)
        yield from documents

    tokenizer = tokenizer_from_flag(flag, training())
    return tokenizer, (sample or None)


def prepare(inputs: list[str], out: str, tokenizer_flag: str = "byte", val_fraction: float = 0.05,
            name: str | None = None, dtype_flag: str = "auto", *, text_field: str = "text",
            id_field: str | None = None, strict: bool = False, workers: int = 1, engine: str = "local",
            ray_address: str | None = None, tokenizer_sample: int = DEFAULT_BUDGET) -> dict:
    """Prepare a dataset at `out`; returns its metadata. Bad input raises DataError and
    leaves nothing at `out`."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    if tokenizer_sample < 1:
        raise DataError(f"--tokenizer-sample {tokenizer_sample}: must be a positive number of bytes")
    require(engine)  # a missing Ray is said before any work
    out_path = Path(out).expanduser()
    prepare_target(out_path.absolute())  # an existing dataset, or a live prepare of it, is refused before any work
    listed = list_files(tuple(inputs), key="--input")
    units, fields = make_plan(listed.files), Fields(text_field, id_field)
    tokenizer, sample = _tokenizer(tokenizer_flag, units, fields, val_fraction, strict, tokenizer_sample)
    dtype = token_dtype(tokenizer.vocab_size, dtype_flag)
    described = describe(tokenizer, tokenizer_flag)
    n_files = len({path for unit in units for _, path in unit.files})
    with StoreWriter(out_path) as store:
        directory = str(adopt_units(store.out, store.staging))
        plan = plan_hash(units, {"val_fraction": val_fraction, "text_field": text_field, "id_field": id_field,
                                 "tokenizer": described, "token_dtype": dtype})
        resumed = clear_stale(directory, plan)  # finished units a killed prepare of this plan left
        job = Job(directory, plan, val_fraction, fields, TokenizerSpec.of(tokenizer), dtype)
        writers = {split: store.split(split, dtype, tokenizer.vocab_size) for split in SPLITS}
        bad, empty = Counter(), 0
        with contextlib.closing(map_units(job, units, engine, workers, ray_address)) as infos:
            for info in infos:
                if strict and info["first_bad"]:
                    raise DataError(f"--strict: {info['first_bad']}")
                _merge(writers, directory, info, dtype)
                bad.update(info["skipped"])
                empty += info["empty"]
        splits = {split: writer.close() for split, writer in writers.items()}
        if bad and not splits["train"]["documents"] + splits["val"]["documents"]:
            raise DataError(f"--input: no documents in the {n_files} files matched, only bad records "
                            f"({', '.join(f'{n} {r}' for r, n in sorted(bad.items()))}); see --text-field")
        check_split("--input", n_files, splits["train"]["documents"], splits["val"]["documents"], val_fraction)
        digest = hashlib.sha256(b"".join(writers[n].digest.digest() for n in SPLITS)).hexdigest()
        return store.commit({
            "name": name or out_path.name, "tokenizer": {**described, **({"sample": sample} if sample else {})},
            "token_dtype": dtype, "val_fraction": val_fraction,
            "inputs": list(inputs), "text_field": text_field, "id_field": id_field, "files": n_files,
            "units": len(units), "skipped": {**listed.skipped(), **dict(sorted(bad.items()))},
            "empty_documents": empty, "resumed_units": resumed, "splits": splits, "content_sha256": digest,
            "unigram_entropy": entropy_of_counts(writers["train"].counts),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }, tokenizer)


def summary(metadata: dict, out: str) -> str:
    s, t = metadata["splits"], metadata["tokenizer"]
    skipped = metadata.get("skipped", {})
    bad = {reason: skipped[reason] for reason in BAD_REASONS if skipped.get(reason)}
    empty = metadata.get("empty_documents", 0)
    words = [describe_skipped(skipped),
             f"{sum(bad.values())} bad records ({', '.join(f'{n} {r}' for r, n in bad.items())})" if bad else "",
             f"{empty} empty documents" if empty else ""]
    skipped = ", ".join(w for w in words if w)
    return (f"prepared {out}: {t['spec']} tokens (vocab {t['vocab_size']}, {metadata['token_dtype']}); "
            f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} documents, "
            f"val {s['val']['tokens']:,} / {s['val']['documents']}; "
            f"{s['train']['tokens'] / max(s['train']['bytes'], 1):.3f} tokens per byte"
            + (f"; skipped: {skipped}" if skipped else "")
            + (f"; resumed {metadata['resumed_units']} staged units" if metadata.get("resumed_units") else ""))
