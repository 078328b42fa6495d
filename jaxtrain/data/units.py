"""The map of a prepare: one work unit (plan.py) -> its documents split, tokenized and
staged on disk, a pure function of the unit, the settings and the tokenizer.

    <staging>/units/<index>/{train,val}.tokens   raw tokens (token dtype, little endian),
                                                 every document ended by the end token
    <staging>/units/<index>/{train,val}.lengths  int64 tokens per document
    <staging>/units/<index>/info.json            plan hash, per-split counts, skipped
                                                 records per reason, the first bad record

A unit is written into `<index>.tmp-<pid>-<random>` and renamed to `<index>` when
complete, so `<index>` existing means finished (a killed worker leaves only a .tmp, which
the next prepare clears), and a finished unit whose info.json names the same plan hash is
reused as it is: that is resume. Records are read, encoded and written a batch at a time
(at most 256 documents or 2 MiB), so a worker's memory is one batch whatever the unit's
size, and the merge (`read_tokens`) streams a unit's tokens back in slices.

Workers get the tokenizer as its JSON (`TokenizerSpec`) and rebuild it once per process;
each uses `threads` of the `tokenizers` library's pool (all cores divided among the
workers, so N workers do not start N x cores threads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxtrain.config.errors import DataError
from jaxtrain.data.corpus import is_val, read_text_file
from jaxtrain.data.plan import Unit
from jaxtrain.data.records import EMPTY, Bad, Fields, iter_arrow, iter_jsonl, iter_parquet
from jaxtrain.data.token_store import SPLITS
from jaxtrain.data.tokenizer import ByteTokenizer, Tokenizer

_BATCH_DOCUMENTS, _BATCH_BYTES = 256, 1 << 21
_READ_TOKENS = 1 << 22  # tokens read back at a time by the merge


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer as data a worker process can receive: kind, its JSON (BPE), its name."""

    kind: str
    json: str | None = None
    source: str = "byte"

    @staticmethod
    def of(tokenizer: Tokenizer) -> "TokenizerSpec":
        if tokenizer.kind == "byte":
            return TokenizerSpec("byte")
        return TokenizerSpec("bpe", tokenizer.tokenizer.to_str(), tokenizer.source)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every unit of one prepare shares."""

    directory: str  # <staging>/units
    plan: str  # plan.plan_hash
    val_fraction: float
    fields: Fields
    tokenizer: TokenizerSpec
    dtype: str
    threads: int = 0  # the tokenizers library's threads per worker; 0 = its default (all cores)

    def with_threads(self, threads: int) -> "Job":
        return dataclasses.replace(self, threads=threads)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec.kind == "byte":
        return ByteTokenizer()
    if spec.json not in _TOKENIZERS:
        from tokenizers import Tokenizer as HfTokenizer

        from jaxtrain.data.tokenizer import BpeTokenizer

        _TOKENIZERS.clear()  # one tokenizer per worker process
        _TOKENIZERS[spec.json] = BpeTokenizer(HfTokenizer.from_str(spec.json), spec.source)
    return _TOKENIZERS[spec.json]


def iter_unit(unit: Unit, fields: Fields) -> Iterator:
    """The unit's records in order: (key, bytes) documents, EMPTY, or Bad (records.py)."""
    for root, path in unit.files:
        relative = os.path.relpath(path, root)
        if unit.kind == "text":
            data = read_text_file(path)
            yield (relative, data) if data else EMPTY
        elif unit.kind == "jsonl":
            yield from iter_jsonl(path, relative, fields)
        elif unit.kind == "parquet":
            yield from iter_parquet(path, relative, fields, unit.row_group)
        else:
            yield from iter_arrow(path, relative, fields)


def _batches(records: Iterator, tally: dict) -> Iterator[list[tuple[str, bytes]]]:
    """Documents in batches; EMPTY and Bad records counted into `tally`."""
    batch, size = [], 0
    for record in records:
        if record is EMPTY:
            tally["empty"] += 1
        elif isinstance(record, Bad):
            tally["skipped"][record.reason] += 1
            tally["first_bad"] = tally["first_bad"] or record.message()
        else:
            batch.append(record)
            size += len(record[1])
            if len(batch) == _BATCH_DOCUMENTS or size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _write(job: Job, unit: Unit, tmp: Path) -> dict:
    tokenizer = _tokenizer(job.tokenizer)
    eos = np.array([tokenizer.eos_id])
    tally = {"empty": 0, "skipped": Counter(), "first_bad": None}
    counts = {name: {"documents": 0, "tokens": 0, "bytes": 0} for name in SPLITS}
    outputs = {name: (open(tmp / f"{name}.tokens", "wb"), open(tmp / f"{name}.lengths", "wb")) for name in SPLITS}
    try:
        for batch in _batches(iter_unit(unit, job.fields), tally):
            encoded = tokenizer.encode_documents([data for _, data in batch])
            for (key, data), tokens in zip(batch, encoded):
                name = "val" if is_val(key, job.val_fraction) else "train"
                tokens = np.concatenate([tokens, eos])
                outputs[name][0].write(tokens.astype(np.dtype(job.dtype).newbyteorder("<")).tobytes())
                outputs[name][1].write(np.array([len(tokens)], "<i8").tobytes())
                counts[name]["documents"] += 1
                counts[name]["tokens"] += len(tokens)
                counts[name]["bytes"] += len(data)
    finally:
        for files in outputs.values():
            for f in files:
                f.close()
    sizes = {f"{name}.{kind}": os.path.getsize(tmp / f"{name}.{kind}")
             for name in SPLITS for kind in ("tokens", "lengths")}
    return {"plan": job.plan, "index": unit.index, "splits": counts, "empty": tally["empty"],
            "skipped": dict(sorted(tally["skipped"].items())), "first_bad": tally["first_bad"], "files": sizes}


def finished(directory: str, index: int, plan: str) -> dict | None:
    """A staged unit's info when it is complete (its files of the sizes it recorded: a
    crash of the machine can leave a renamed directory with short files) and of this
    plan, else None."""
    unit = Path(directory) / str(index)
    try:
        info = json.loads((unit / "info.json").read_text())
        complete = all((unit / name).stat().st_size == size for name, size in info["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return info if complete and info.get("plan") == plan else None


def run_unit(job: Job, unit: Unit) -> dict:
    """Stage one unit (or reuse it, staged by this plan before); returns its info."""
    if job.threads:
        os.environ.setdefault("RAYON_NUM_THREADS", str(job.threads))  # read when the pool first starts
    if (info := finished(job.directory, unit.index, job.plan)) is not None:
        return info
    final = Path(job.directory) / str(unit.index)
    tmp = Path(job.directory) / f"{unit.index}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        info = _write(job, unit, tmp)
        (tmp / "info.json").write_text(json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)  # another plan's unit, or a partial one
        tmp.rename(final)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear_stale(directory: str, plan: str) -> int:
    """Remove what is not a finished unit of `plan` (a killed worker's .tmp, another plan's
    units); returns how many finished units are kept for reuse."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    kept = 0
    for entry in root.iterdir():
        if entry.name.isdigit() and finished(directory, int(entry.name), plan) is not None:
            kept += 1
        else:
            shutil.rmtree(entry, ignore_errors=True)
    return kept


def read_tokens(directory: str, index: int, split: str, dtype: str) -> Iterator[np.ndarray]:
    """A staged unit's tokens of one split, in slices of at most 2^22 tokens."""
    path = Path(directory) / str(index) / f"{split}.tokens"
    kind = np.dtype(dtype).newbyteorder("<")
    total = path.stat().st_size // kind.itemsize
    for start in range(0, total, _READ_TOKENS):
        yield np.fromfile(path, kind, count=min(_READ_TOKENS, total - start), offset=start * kind.itemsize)


def read_lengths(directory: str, index: int, split: str) -> np.ndarray:
    path = Path(directory) / str(index) / f"{split}.lengths"
    if not path.exists():
        raise DataError(f"{path}: a staged unit lost its files; remove the staging directory and prepare again")
    return np.fromfile(path, "<i8")
