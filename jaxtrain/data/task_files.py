"""The files of evaluation tasks (config `eval.tasks`, scored by jaxtrain/run/tasks.py;
docs/evaluation.md): local files only, nothing is downloaded.

* held-out text (`bits_per_byte`), one document each of: the validation split of a prepared
  dataset (a directory with metadata.json; its tokens decoded back to text with the
  dataset's own tokenizer), the `text_field` of every line of a `.jsonl` file, or text files
  / directories / globs (`{stdlib}` and `**` as in data.paths, each file one document);
* questions (`multiple_choice`): a `.jsonl` file, one per line,
      {"context": "2 + 2 =", "choices": ["3", "4", "5"], "gold": 1}
  context: a string (may be empty); choices: a list of non-empty strings; gold: the index
  of the right choice. Other fields are ignored.

A file that cannot be used is one DataError line naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxtrain.config.errors import DataError
from jaxtrain.data import token_store
from jaxtrain.data.corpus import read_text_file
from jaxtrain.data.files import expand_paths
from jaxtrain.data.tokenizer import open_saved


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int


def read_documents(path: str, text_field: str = "text", limit: int | None = None,
                   key: str = "eval.tasks") -> list[bytes]:
    """Held-out documents as UTF-8 bytes, in file order, the first `limit` of them."""
    directory = Path(path).expanduser()
    if (directory / "metadata.json").exists():
        documents = _store_documents(directory, limit)
    elif path.endswith(".jsonl"):
        documents = [_field(row, text_field, str, path, line).encode("utf-8")
                     for line, row in _rows(path, limit)]
    else:
        documents = [read_text_file(file) for _, file in expand_paths((path,), key)[:limit]]
    if not documents:
        raise DataError(f"{path}: no documents ({key})")
    return documents


def read_questions(path: str, limit: int | None = None, key: str = "eval.tasks") -> list[Question]:
    """The multiple-choice questions of a jsonl file, the first `limit` of them."""
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: a multiple_choice task reads a .jsonl file of questions ({key})")
    questions = []
    for line, row in _rows(path, limit):
        context = _field(row, "context", str, path, line)
        choices = _field(row, "choices", list, path, line)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{path} line {line}: field 'choices' must be a list of non-empty strings")
        gold = _field(row, "gold", int, path, line)
        if not 0 <= gold < len(choices):
            raise DataError(f"{path} line {line}: field 'gold' is {gold}, not an index of the "
                            f"{len(choices)} choices")
        questions.append(Question(context, tuple(choices), gold))
    if not questions:
        raise DataError(f"{path}: no questions ({key})")
    return questions


def _rows(path: str, limit: int | None) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line, up to `limit` objects."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    count = 0
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        if limit is not None and count >= limit:
            return
        try:
            row = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path} line {number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: not a JSON object")
        count += 1
        yield number, row


def _field(row: dict, name: str, kind: type, path: str, line: int) -> Any:
    if name not in row:
        raise DataError(f"{path} line {line}: no field '{name}'")
    value = row[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path} line {line}: field '{name}' must be a {kind.__name__}, "
                        f"not {type(value).__name__}")
    return value


def _store_documents(directory: Path, limit: int | None) -> list[bytes]:
    """The validation split's documents of a prepared dataset, as text again."""
    store = token_store.open_store(directory)
    tokenizer = open_saved(store.metadata["tokenizer"]["kind"], str(store.path))
    starts = store.val.doc_starts[:-1][:limit]
    ends = store.val.doc_starts[1:][:limit] - 1  # each document's end token is not text
    return [tokenizer.decode(store.val.read(np.array([start]), int(end - start))[0]).encode("utf-8")
            for start, end in zip(starts, ends)]
