"""The plan of a prepare: the listed input files -> a deterministic list of work units.

    plan (here)  ->  map: each unit read, split, tokenized, staged (units.py, engines.py)
                 ->  ordered merge: units appended in plan order (prepare.py)

A unit is the smallest piece one worker reads on its own:

    text     a run of consecutive text files, up to 64 files or 16 MiB
    jsonl    one jsonl / jsonl.gz / jsonl.zst file (compressed streams do not seek)
    parquet  one row group of a parquet file
    arrow    one Arrow file of a Hugging Face `save_to_disk` directory

Units follow the sorted file list (files.py), so their order, and with it the store, is a
function of the inputs alone: not of the number of workers, nor of which finishes first.
A directory holding `state.json` and `*.arrow` files is a saved `datasets` dataset: its
Arrow files are read and its JSON files (state, dataset_info) are its description, not
documents; a saved DatasetDict is its splits' directories, all read (and split again by
the hash here), its `dataset_dict.json` left out.

`plan_hash` names the plan together with everything a unit's result depends on (each
file's size and modification time, the fields, the split fraction, the tokenizer's
identity, the token dtype, the unit format), so a staged unit is reused by a later
prepare (resume) only when it would come out the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jaxtrain.data.records import format_of, parquet_row_groups

UNIT_FORMAT = 1  # bump when a unit's staged files change meaning
_GROUP_FILES, _GROUP_BYTES = 64, 16 << 20


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    kind: str  # text | jsonl | parquet | arrow
    files: tuple[tuple[str, str], ...]  # (root, path): the split hashes the path relative to root
    row_group: int = 0  # parquet only


def _saved_datasets(files: list[tuple[str, str]]) -> set[str]:
    """Directories that are a `datasets` save_to_disk (state.json beside Arrow files)."""
    directories = {os.path.dirname(path) for _, path in files if os.path.basename(path) == "state.json"}
    return {d for d in directories if any(name.endswith(".arrow") for name in os.listdir(d))}


def _kept(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The files that hold documents: a saved dataset's JSON description left out, and a
    saved DatasetDict's `dataset_dict.json` above its splits' directories."""
    saved = _saved_datasets(files)
    dicts = {os.path.dirname(d) for d in saved}
    return [(root, path) for root, path in files
            if not (os.path.dirname(path) in saved and path.endswith(".json"))
            and not (os.path.dirname(path) in dicts and os.path.basename(path) == "dataset_dict.json")]


def make_plan(files: list[tuple[str, str]]) -> list[Unit]:
    """The units of the listed (root, path) files, in file order."""
    units: list[Unit] = []
    group: list[tuple[str, str]] = []
    size = 0

    def close_group() -> None:
        nonlocal group, size
        if group:
            units.append(Unit(len(units), "text", tuple(group)))
        group, size = [], 0

    for root, path in _kept(files):
        kind = format_of(path)
        if kind == "text":
            group.append((root, path))
            size += os.path.getsize(path) if os.path.isfile(path) else 0
            if len(group) == _GROUP_FILES or size >= _GROUP_BYTES:
                close_group()
            continue
        close_group()
        groups = parquet_row_groups(path) if kind == "parquet" else 1
        units += [Unit(len(units) + g, kind, ((root, path),), g) for g in range(groups)]
    close_group()
    return units


def _stat(path: str) -> list[int]:
    try:
        status = os.stat(path)
        return [status.st_size, status.st_mtime_ns]
    except OSError:
        return [-1, -1]  # unreadable: the unit will say so when it is read


def plan_hash(units: list[Unit], settings: dict) -> str:
    """sha256 of the units (files, sizes, modification times) and the settings that shape
    a unit's result."""
    listed = [[u.kind, u.row_group, [[root, path, *_stat(path)] for root, path in u.files]] for u in units]
    text = json.dumps({"unit_format": UNIT_FORMAT, "settings": settings, "units": listed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
