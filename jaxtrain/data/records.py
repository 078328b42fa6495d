"""Record files -> documents: jsonl (plain, .gz, .zst), parquet, Arrow (Hugging Face
`save_to_disk`), and text files, one document per file.

A document is one record: its `--text-field` value (a string), keyed for the split and
the tokenizer sample (corpus.py, sample.py) by its `--id-field` value when one is given,
else by `<relative path of its file>#<row>` (row = 0-based line of a jsonl file, row of a
parquet file, row of an Arrow file). A text file is keyed by its relative path, exactly
as before records existed, so text stores are unchanged.

Readers stream: a jsonl file a line at a time (gzip; the `zstandard` package's stream
reader, across frames), a parquet row group a batch of rows at a time reading only the
text and id columns (pyarrow.parquet), an Arrow file a record batch at a time through a
memory map (pyarrow IPC stream format, what `datasets` writes). Nothing holds a file.

Bad records (the policy, docs/data.md): a record that is not a document is yielded as a
`Bad(where, reason)` and the caller counts it per reason, or with --strict stops at the
first. Reasons: invalid_json (a line that does not parse), invalid_utf8 (a line that is
not UTF-8, or a text with lone surrogates), not_an_object, missing_text_field (absent or
null), non_string_text, missing_id_field, nul_character (U+0000 is the byte tokenizer's
end-of-document token; text files holding NUL are refused as binary). An empty text is no
document and no bad record: it is counted in `empty`, as empty text files are.
A column missing from a table file, or a text column that is not a string, is no bad
record but a wrong flag or file: one DataError naming the flag, the file and its columns.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from typing import Iterator

from jaxtrain.config.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
BAD_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "missing_text_field", "non_string_text",
               "missing_id_field", "nul_character")
_ROWS = 1024  # rows converted to Python at a time from a table


@dataclasses.dataclass(frozen=True)
class Fields:
    text: str = "text"
    id: str | None = None


@dataclasses.dataclass(frozen=True)
class Bad:
    where: str  # FILE:LINE or FILE row N
    reason: str
    detail: str = ""

    def message(self) -> str:
        return f"{self.where}: {self.reason.replace('_', ' ')}" + (f" ({self.detail})" if self.detail else "")


EMPTY = "empty"  # what iter_* yield for an empty text: counted, not a document, not bad


def format_of(path: str) -> str:
    """"jsonl", "parquet", "arrow" or "text", by the file's name."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return next((suffix[1:] for suffix in TABLE_SUFFIXES if name.endswith(suffix)), "text")


def _document(text, key, where: str, fields: Fields):
    """(key, UTF-8 bytes), EMPTY, or a Bad: the checks every record format shares."""
    if text is None:
        return Bad(where, "missing_text_field", f"no {fields.text!r}")
    if not isinstance(text, str):
        return Bad(where, "non_string_text", f"{fields.text!r} is {type(text).__name__}")
    if fields.id is not None and key is None:
        return Bad(where, "missing_id_field", f"no {fields.id!r}")
    if not text:
        return EMPTY
    if "\0" in text:
        return Bad(where, "nul_character", f"at character {text.index(chr(0))}")
    try:
        return str(key), text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Bad(where, "invalid_utf8", f"{err.reason} at character {err.start}")


def _open_lines(path: str):
    """A binary line stream of a jsonl file, decompressed as its name says."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)
    return open(path, "rb")


def _damaged_stream_errors(path: str) -> tuple[type, ...]:
    """What reading a jsonl file raises when it cannot be read or its compression is damaged."""
    if path.lower().endswith(".zst"):
        import zstandard

        return OSError, EOFError, zstandard.ZstdError
    return OSError, EOFError  # gzip raises BadGzipFile (an OSError) or EOFError


def iter_jsonl(path: str, relative: str, fields: Fields) -> Iterator:
    """Every line of a jsonl file as a document, EMPTY or Bad (blank lines are no record)."""
    try:
        with _open_lines(path) as lines:
            for index, line in enumerate(lines):
                if not line.strip():
                    continue
                where = f"{path}:{index + 1}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError as err:
                    yield Bad(where, "invalid_utf8", f"byte {err.start}")
                    continue
                except ValueError as err:
                    yield Bad(where, "invalid_json", str(err))
                    continue
                if not isinstance(record, dict):
                    yield Bad(where, "not_an_object", type(record).__name__)
                    continue
                key = record.get(fields.id) if fields.id else f"{relative}#{index}"
                yield _document(record.get(fields.text), key, where, fields)
    except _damaged_stream_errors(path) as err:  # unreadable, or a damaged .gz / .zst stream
        words = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read ({words})") from None


def _columns(schema, path: str, fields: Fields) -> list[str]:
    """The columns to read, checked: a missing column or a non-string text is an error."""
    import pyarrow as pa

    wanted = [fields.text] + ([fields.id] if fields.id else [])
    for flag, column in zip(("--text-field", "--id-field"), wanted):
        if column not in schema.names:
            raise DataError(f"{flag} {column}: no such column in {path} (columns: {', '.join(schema.names)})")
    kind = schema.field(fields.text).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"--text-field {fields.text}: column of {path} holds {kind}, not strings")
    return wanted


def _table_rows(batches, first_row: int, path: str, relative: str, fields: Fields) -> Iterator:
    row = first_row
    for batch in batches:
        texts = batch.column(0).to_pylist()
        keys = batch.column(1).to_pylist() if fields.id else [f"{relative}#{row + i}" for i in range(len(texts))]
        for i, (text, key) in enumerate(zip(texts, keys)):
            yield _document(text, key, f"{path} row {row + i}", fields)
        row += len(texts)


def iter_parquet(path: str, relative: str, fields: Fields, row_group: int) -> Iterator:
    """The rows of one row group of a parquet file (only the text and id columns read)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = _columns(parquet.schema_arrow, path, fields)
        first = sum(parquet.metadata.row_group(g).num_rows for g in range(row_group))
        batches = parquet.iter_batches(batch_size=_ROWS, row_groups=[row_group], columns=columns)
        yield from _table_rows(batches, first, path, relative, fields)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError(f"{path}: cannot read as parquet ({str(err).splitlines()[0][:200]})") from None


def parquet_row_groups(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_row_groups
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as parquet ({str(err).splitlines()[0][:200]})") from None


def iter_arrow(path: str, relative: str, fields: Fields) -> Iterator:
    """The rows of an Arrow IPC stream file (a `datasets` save_to_disk shard; the IPC file
    format is read too), memory-mapped."""
    import pyarrow as pa

    try:
        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:  # not a stream: the IPC file format (Feather v2)?
                reader = pa.ipc.open_file(source)
                reader = pa.RecordBatchReader.from_batches(reader.schema, map(reader.get_batch,
                                                                               range(reader.num_record_batches)))
            columns = _columns(reader.schema, path, fields)
            batches = (batch.select(columns) for batch in reader)
            yield from _table_rows(batches, 0, path, relative, fields)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as an Arrow stream ({str(err).splitlines()[0][:200]})") from None
