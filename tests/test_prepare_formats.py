"""`jaxtrain data prepare` on record files: every format holding the same documents as a
folder of text files prepares the same store, bad records follow the policy (counted, or
with --strict the first is one line and nothing is written), the BPE's sample."""

import gzip
import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import cli_in_process
from jaxtrain.config.errors import DataError
from jaxtrain.data import token_store
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sample import bottom_k

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store's splits (token arrays, document index), by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for split in ("train", "val")
            for p in sorted((path / split).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of text files (two subfolders, one empty file) and its records in path order,
    with the relative path as id, and the store the text files prepare to."""
    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    for package in ("json", "email"):
        (texts / package).mkdir(parents=True)
        for path in sorted((STDLIB / package).glob("*.py")):
            shutil.copy(path, texts / package)
    (texts / "json" / "empty.py").write_bytes(b"")
    records = [{"text": p.read_bytes().decode(), "id": str(p.relative_to(texts)), "n": i}
               for i, p in enumerate(sorted(p for p in texts.rglob("*") if p.is_file()))]
    reference = prepare([str(texts)], str(root / "reference"), val_fraction=0.2)
    return root, records, reference


def _lines(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _write_format(kind: str, records: list[dict], directory: Path) -> None:
    directory.mkdir()
    half = len(records) // 2
    if kind == "jsonl":
        (directory / "all.jsonl").write_bytes(_lines(records))
    elif kind == "jsonl.gz":  # two files: documents continue across files in name order
        for name, part in (("a", records[:half]), ("b", records[half:])):
            (directory / f"{name}.jsonl.gz").write_bytes(gzip.compress(_lines(part)))
    elif kind == "jsonl.zst":  # two zstd frames in one file, as `cat a.zst b.zst` makes
        compressor = zstandard.ZstdCompressor()
        frames = compressor.compress(_lines(records[:half])) + compressor.compress(_lines(records[half:]))
        (directory / "all.jsonl.zst").write_bytes(frames)
    elif kind == "parquet":  # many row groups: each is a unit
        pq.write_table(pa.Table.from_pylist(records), directory / "all.parquet", row_group_size=7)
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(directory / "saved"), num_shards=3)


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "saved_to_disk"]


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_prepares_the_text_files_store(kind, corpus, tmp_path):
    root, records, reference = corpus
    _write_format(kind, records, tmp_path / "in")
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "out"), val_fraction=0.2, id_field="id")
    assert meta["content_sha256"] == reference["content_sha256"] and meta["splits"] == reference["splits"]
    assert store_files(tmp_path / "out") == store_files(root / "reference")
    assert meta["empty_documents"] == reference["empty_documents"] == 1
    assert meta["units"] > 1 or kind in ("jsonl", "jsonl.zst")
    assert meta["splits"]["val"]["documents"] > 0


def test_a_bpe_store_from_records_equals_the_text_files_one(corpus, tmp_path):
    root, records, _ = corpus
    _write_format("jsonl.zst", records, tmp_path / "in")
    text = prepare([str(root / "texts")], str(tmp_path / "text"), "bpe:320", val_fraction=0.2)
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "zst"), "bpe:320", val_fraction=0.2, id_field="id")
    assert meta["tokenizer"]["sha256"] == text["tokenizer"]["sha256"]
    assert meta["content_sha256"] == text["content_sha256"]
    assert store_files(tmp_path / "zst") == store_files(tmp_path / "text")


def test_without_an_id_field_records_split_by_file_and_row(corpus, tmp_path):
    """Keys are FILE#ROW: the same records in one parquet file split the same way whatever
    its row groups."""
    _, records, _ = corpus
    texts = [{"text": r["text"]} for r in records]
    for name, group in (("one", 1000), ("many", 5)):
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pylist(texts), tmp_path / name / "c.parquet", row_group_size=group)
    one = prepare([str(tmp_path / "one")], str(tmp_path / "s1"), val_fraction=0.2)
    many = prepare([str(tmp_path / "many")], str(tmp_path / "s2"), val_fraction=0.2)
    assert one["units"] == 1 and many["units"] > 5
    assert store_files(tmp_path / "s1") == store_files(tmp_path / "s2")


GOOD = [{"text": f"document number {i}\n" * 20} for i in range(60)]
BAD_LINES = {  # case -> (jsonl line, reason as counted)
    "invalid json": (b'{"text": "unterminated\n', "invalid_json"),
    "invalid utf-8": (b'{"text": "caf\xe9"}\n', "invalid_utf8"),
    "lone surrogate": (b'{"text": "\\ud800"}\n', "invalid_utf8"),
    "not an object": (b'["text"]\n', "not_an_object"),
    "missing text": (b'{"body": "x"}\n', "missing_text_field"),
    "null text": (b'{"text": null}\n', "missing_text_field"),
    "non-string text": (b'{"text": 5}\n', "non_string_text"),
    "NUL character": (b'{"text": "a\\u0000b"}\n', "nul_character"),
}


def _bad_file(tmp_path: Path, line: bytes) -> Path:
    path = tmp_path / "in" / "c.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(_lines(GOOD[:30]) + line + b'{"text": ""}\n\n' + _lines(GOOD[30:]))
    return path


def test_bad_records_are_counted_per_reason_by_default(tmp_path, capsys):
    path = tmp_path / "in" / "c.jsonl"
    path.parent.mkdir()
    path.write_bytes(_lines(GOOD) + b"".join(line for line, _ in BAD_LINES.values()) + b'{"text": ""}\n')
    status, out, err = cli_in_process(capsys, "data", "prepare", "--input", str(path), "--out", str(tmp_path / "ds"),
                                      "--val-fraction", "0.2", "--workers", "1")
    assert status == 0, err
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["skipped"] == {"directory_links": 0, "duplicate_paths": 0, "invalid_json": 1, "invalid_utf8": 2,
                               "missing_text_field": 2, "non_string_text": 1, "not_an_object": 1, "nul_character": 1}
    assert meta["empty_documents"] == 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(GOOD)
    assert ("skipped: 8 bad records (1 invalid_json, 2 invalid_utf8, 1 not_an_object, 2 missing_text_field, "
            "1 non_string_text, 1 nul_character), 1 empty documents") in out


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_strict_stops_at_the_first_bad_record_naming_file_and_line(case, tmp_path, capsys):
    line, reason = BAD_LINES[case]
    path = _bad_file(tmp_path, line)
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", str(path), "--out", str(tmp_path / "ds"),
                                    "--strict", "--workers", "1")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--strict: {path}:31: {reason.replace('_', ' ')}" in err
    assert not (tmp_path / "ds").exists() and [p.name for p in tmp_path.iterdir()] == ["in"]
    status, out, err = cli_in_process(capsys, "data", "prepare", "--input", str(path), "--out", str(tmp_path / "ds"),
                                      "--workers", "1")
    assert status == 0 and f"1 {reason}" in out and "1 empty documents" in out, err  # the empty one is no bad record


def test_strict_accepts_empty_texts_and_names_a_missing_id(tmp_path):
    with_ids = [{**record, "id": i} for i, record in enumerate(GOOD)]
    path = tmp_path / "c.jsonl"
    path.write_bytes(_lines(with_ids[:30]) + b'{"text": "", "id": "e"}\n' + _lines(with_ids[30:]))
    meta = prepare([str(path)], str(tmp_path / "ds"), strict=True, id_field="id")
    assert meta["empty_documents"] == 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(GOOD)
    path.write_bytes(_lines(with_ids[:30]) + b'{"text": "no id here"}\n' + _lines(with_ids[30:]))
    with pytest.raises(DataError, match=rf"--strict: {path}:31: missing id field \(no 'id'\)"):
        prepare([str(path)], str(tmp_path / "ds2"), strict=True, id_field="id")
    assert not (tmp_path / "ds2").exists()


def test_table_files_name_a_missing_column_and_a_bad_row(tmp_path):
    (tmp_path / "in").mkdir()
    rows = GOOD[:40] + [{"text": None}] + GOOD[40:]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "t.parquet", row_group_size=16)
    with pytest.raises(DataError, match=r"--text-field body: no such column in .*t\.parquet \(columns: text\)"):
        prepare([str(tmp_path / "in")], str(tmp_path / "ds"), text_field="body")
    with pytest.raises(DataError, match=r"--strict: .*t\.parquet row 40: missing text field"):
        prepare([str(tmp_path / "in")], str(tmp_path / "ds"), strict=True)
    assert prepare([str(tmp_path / "in")], str(tmp_path / "ds"))["skipped"]["missing_text_field"] == 1
    pq.write_table(pa.Table.from_pylist([{"text": 1}] * 30), tmp_path / "in" / "t.parquet")
    with pytest.raises(DataError, match=r"--text-field text: column of .*t\.parquet holds int64, not strings"):
        prepare([str(tmp_path / "in")], str(tmp_path / "ds2"))
    assert not (tmp_path / "ds2").exists()


def test_a_damaged_compressed_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    whole = gzip.compress(_lines(GOOD))
    (tmp_path / "in" / "c.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "in" / "d.jsonl.zst").write_bytes(b"not zstd at all")
    for name in ("c.jsonl.gz", "d.jsonl.zst"):
        status, _, err = cli_in_process(capsys, "data", "prepare", "--input", str(tmp_path / "in" / name),
                                        "--out", str(tmp_path / "ds"), "--workers", "1")
        assert status == 2 and len(err.strip().splitlines()) == 1 and f"{name}: cannot read" in err, err
        assert not (tmp_path / "ds").exists()


def test_the_bpe_sample_is_the_bottom_k_by_hash_whatever_the_order():
    rng = random.Random(0)
    documents = [(f"doc{i}", bytes(rng.randrange(1, 200))) for i in range(500)]
    budget = sum(len(d) for _, d in documents) // 3
    chosen, held = bottom_k(documents, budget)
    import hashlib

    by_hash = sorted(documents, key=lambda kd: hashlib.sha1(kd[0].encode()).digest())
    prefix, size = [], 0
    for key, data in by_hash:  # the definition: the longest prefix of the hash order that fits
        if size + len(data) > budget:
            break
        prefix.append(key)
        size += len(data)
    assert held["documents"] == len(prefix) and held["bytes"] == size <= budget
    shuffled = documents[:]
    rng.shuffle(shuffled)
    again, _ = bottom_k(shuffled, budget)
    assert sorted(again) == sorted(chosen)
    everything, all_held = bottom_k(documents, 10 ** 9)
    assert everything == [d for _, d in documents] and all_held["documents"] == 500  # under the budget: all, in order


def test_a_bpe_trains_on_the_sample_past_the_budget(corpus, tmp_path, capsys):
    root, records, _ = corpus
    _write_format("jsonl", records, tmp_path / "in")
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", str(root / "texts"), "--out",
                                    str(tmp_path / "text"), "--tokenizer", "bpe:300", "--tokenizer-sample", "200K",
                                    "--workers", "1")
    assert status == 0, err
    text = json.loads((tmp_path / "text" / "metadata.json").read_text())
    sample = text["tokenizer"]["sample"]
    assert sample["bytes"] <= 200 * 1024 < sample["of_bytes"] and 0 < sample["documents"] < sample["of_documents"]
    records = records[::-1]  # another order of the same documents: the same sample, the same tokenizer
    shutil.rmtree(tmp_path / "in")
    _write_format("jsonl", records, tmp_path / "in")
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "rec"), "bpe:300", id_field="id", tokenizer_sample=200 * 1024)
    assert meta["tokenizer"]["sample"] == sample and meta["tokenizer"]["sha256"] == text["tokenizer"]["sha256"]
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", str(root / "texts"), "--out",
                                    str(tmp_path / "x"), "--tokenizer-sample", "lots")
    assert status == 2 and "--tokenizer-sample" in err


def test_asking_for_ray_without_ray_names_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` raises ImportError
    path = _bad_file(tmp_path, b"")
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", str(path), "--out", str(tmp_path / "ds"),
                                    "--engine", "ray")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--engine ray: Ray is not installed; pip install 'jaxtrain[distributed]'" in err
    assert not (tmp_path / "ds").exists()


def test_a_store_of_records_opens_and_feeds_windows(corpus, tmp_path):
    _, records, _ = corpus
    _write_format("parquet", records, tmp_path / "in")
    prepare([str(tmp_path / "in")], str(tmp_path / "ds"), val_fraction=0.2)
    store = token_store.open_store(tmp_path / "ds")
    windows = store.train.read(np.array([0, 100]), 64)
    assert windows.shape == (2, 64) and store.metadata["files"] == 1


def test_only_bad_records_is_one_line_and_a_dataset_dict_reads_its_splits(corpus, tmp_path):
    import datasets

    path = tmp_path / "c.jsonl"
    path.write_bytes(_lines([{"body": "x"}] * 5))
    with pytest.raises(DataError, match=r"--input: no documents in the 1 files matched, only bad records "
                                        r"\(5 missing_text_field\); see --text-field"):
        prepare([str(path)], str(tmp_path / "ds"))
    _, records, reference = corpus
    half = len(records) // 2
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:half]),
                          "test": datasets.Dataset.from_list(records[half:])}).save_to_disk(str(tmp_path / "dd"))
    meta = prepare([str(tmp_path / "dd")], str(tmp_path / "ds"), val_fraction=0.2, id_field="id")
    assert meta["files"] == 2 and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == \
        reference["splits"]["train"]["documents"] + reference["splits"]["val"]["documents"]


def test_an_arrow_file_in_the_ipc_file_format_reads_like_a_stream(corpus, tmp_path):
    root, records, _ = corpus
    table = pa.Table.from_pylist(records)
    (tmp_path / "in").mkdir()
    with pa.ipc.new_file(str(tmp_path / "in" / "c.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "ds"), val_fraction=0.2, id_field="id")
    assert store_files(tmp_path / "ds") == store_files(root / "reference") and meta["units"] == 1
