"""`jaxtrain data prepare` and the token store: contents, atomic writes, every bad input."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, cli_in_process
from jaxtrain.config.errors import DataError
from jaxtrain.config.files import load_config
from jaxtrain.data import pipeline, token_store
from jaxtrain.data.corpus import load_corpus
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources
from jaxtrain.data.staging import claim
from jaxtrain.data.store_writer import StoreWriter
from jaxtrain.data.tokenizer import load_tokenizer_file

TINY_INPUTS = ["{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/asyncio/*.py"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    prepare(TINY_INPUTS, str(root / "byte"), "byte", val_fraction=0.1)
    prepare(TINY_INPUTS, str(root / "bpe"), "bpe:1024", val_fraction=0.1)
    return root


def test_a_byte_store_holds_exactly_the_text_corpus(stores):
    corpus = load_corpus(tuple(TINY_INPUTS), 0.1)
    store = token_store.open_store(stores / "byte")
    for split, tokens, starts in (("train", corpus.train, corpus.train_doc_starts),
                                  ("val", corpus.val, corpus.val_doc_starts)):
        part = getattr(store, split)
        np.testing.assert_array_equal(part.read(np.array([0]), part.num_tokens)[0], tokens)
        np.testing.assert_array_equal(part.doc_starts, starts)
    meta = store.metadata
    assert meta["tokenizer"]["kind"] == "byte" and meta["token_dtype"] == "uint8"
    assert meta["splits"]["train"]["documents"] == corpus.n_train_docs
    assert meta["splits"]["val"]["bytes"] == corpus.val_bytes and len(meta["content_sha256"]) == 64


def test_documents_stream_through_many_flushes_unchanged(tmp_path, monkeypatch):
    """With a small flush size (not a multiple of the chunk size) every document is still
    where the text corpus has it."""
    from jaxtrain.data import store_writer

    monkeypatch.setattr(store_writer, "SHARD_TOKENS", 50_000)
    prepare(TINY_INPUTS, str(tmp_path / "streamed"), "byte", val_fraction=0.1)
    corpus = load_corpus(tuple(TINY_INPUTS), 0.1)
    store = token_store.open_store(tmp_path / "streamed")
    assert store.train.num_tokens > 10 * 50_000
    np.testing.assert_array_equal(store.train.read(np.array([0]), store.train.num_tokens)[0], corpus.train)
    np.testing.assert_array_equal(store.train.doc_starts, corpus.train_doc_starts)


def test_a_store_feeds_the_same_batches_as_the_text_corpus(stores, tiny_cfg):
    from_text = pipeline.TrainBatches(tiny_cfg, open_sources(tiny_cfg))
    cfg = load_config(TINY, [f"data.sources=[{{path: '{stores / 'byte'}'}}]"])
    from_store = pipeline.TrainBatches(cfg, open_sources(cfg))
    for _ in range(5):
        np.testing.assert_array_equal(next(from_store), next(from_text))


def test_a_bpe_store_decodes_back_to_its_documents(stores):
    store = token_store.open_store(stores / "bpe")
    tokenizer = load_tokenizer_file(str(stores / "bpe" / "tokenizer.json"))
    meta = store.metadata
    assert meta["tokenizer"]["vocab_size"] == tokenizer.vocab_size == 1024 and meta["token_dtype"] == "uint16"
    assert store.tokens_per_byte("val") < 0.5  # BPE merges bytes
    corpus = load_corpus(tuple(TINY_INPUTS), 0.1)
    starts = store.val.doc_starts
    for d in range(len(starts) - 1):
        tokens = store.val.read(np.array([starts[d]]), int(starts[d + 1] - starts[d]))[0]
        assert tokens[-1] == tokenizer.eos_id and tokenizer.eos_id not in tokens[:-1]
        text = corpus.val[corpus.val_doc_starts[d]:corpus.val_doc_starts[d + 1] - 1].tobytes().decode()
        assert tokenizer.decode(tokens[:-1]) == text


def test_a_long_document_encodes_in_pieces_to_the_ids_of_the_whole(stores):
    tokenizer = load_tokenizer_file(str(stores / "bpe" / "tokenizer.json"))
    text = b"\n".join(p.read_bytes() for p in sorted((REPO / "jaxtrain").rglob("*.py")))
    assert len(text) > 4 * 65536  # several pieces
    whole = tokenizer.tokenizer.encode(text.decode(), add_special_tokens=False).ids
    np.testing.assert_array_equal(tokenizer.encode_documents([text])[0], whole)


def _tree(path):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _write(path, text: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _bad_corpus(tmp_path, case):
    good = [_write(tmp_path / "in" / f"good{i}.py", f"print({i})\n" * 50) for i in range(100)]
    if case == "binary":
        _write(tmp_path / "in" / "blob.py", b"abc\x00\x01\x02")
    if case == "empty":
        for path in good:
            path.write_bytes(b"")
    return str(tmp_path / "in" / "*.py")


PREPARE_ERRORS = {
    "missing input": (lambda t: ["--input", str(t / "nowhere" / "*.txt")], "no files match"),
    "empty corpus": (lambda t: ["--input", _bad_corpus(t, "empty")], "are all empty"),
    "binary file": (lambda t: ["--input", _bad_corpus(t, "binary")], "blob.py: binary file"),
    "unreadable file": (lambda t: ["--input", "/proc/self/mem"], "/proc/self/mem: cannot read"),
    "vocabulary exceeds dtype": (lambda t: ["--input", _bad_corpus(t, ""), "--tokenizer", "bpe:300",
                                            "--token-dtype", "uint8"], "--token-dtype uint8"),
    "bad bpe size": (lambda t: ["--input", _bad_corpus(t, ""), "--tokenizer", "bpe:lots"], "bpe:lots"),
    "missing tokenizer file": (lambda t: ["--input", _bad_corpus(t, ""), "--tokenizer", str(t / "tok.json")],
                               "tok.json: no such file"),
    "not a tokenizer file": (lambda t: ["--input", _bad_corpus(t, ""), "--tokenizer",
                                        str(_write(t / "bad.json", "{}"))], "bad.json: not a tokenizers JSON"),
    "bad val fraction": (lambda t: ["--input", _bad_corpus(t, ""), "--val-fraction", "1.5"], "--val-fraction"),
}


@pytest.mark.parametrize("case", PREPARE_ERRORS, ids=list(PREPARE_ERRORS))
def test_bad_prepare_input_is_one_line_naming_the_culprit(case, tmp_path, capsys):
    args, fragment = PREPARE_ERRORS[case]
    status, _, err = cli_in_process(capsys, "data", "prepare", *args(tmp_path), "--out", str(tmp_path / "ds"))
    assert status == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.tmp-*"))


def test_an_existing_dataset_is_never_overwritten(stores, capsys):
    before = _tree(stores / "byte")
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", *TINY_INPUTS, "--out", str(stores / "byte"))
    assert status == 2 and "already exists" in err
    assert _tree(stores / "byte") == before


TRAIN_ERRORS = {
    "no such dataset": (lambda s: ["--set", f"data.sources=[{{path: '{s / 'absent'}'}}]"], "no such dataset"),
    "not a dataset": (lambda s: ["--set", f"data.sources=[{{path: '{s}'}}]"], "no metadata.json"),
    "vocabulary mismatch": (lambda s: ["--set", f"data.sources=[{{path: '{s / 'bpe'}'}}]"],
                            "model.vocab_size': 256 is smaller than the vocabulary of dataset 'bpe' (1024 ids)"),
    "mixed tokenizers": (lambda s: ["--set", f"data.sources=[{{path: '{s / 'bpe'}'}}, {{path: '{s / 'byte'}'}}]",
                                    "--set", "model.vocab_size=1024"], "a mixture needs one tokenizer"),
    "split shorter than a window": (lambda s: ["--set", f"data.sources=[{{path: '{s / 'byte'}'}}]",
                                               "--set", "data.seq_len=1000000", "--set", "train.batch_size=8"],
                                    "data.seq_len+1=1000001"),
    "unknown phase source": (lambda s: ["--set", f"data.sources=[{{path: '{s / 'byte'}'}}]", "--set",
                                        "data.phases=[{start_step: 5, weights: {other: 1}}]"], "unknown sources"),
}


@pytest.mark.parametrize("case", TRAIN_ERRORS, ids=list(TRAIN_ERRORS))
def test_bad_data_for_train_is_one_line_naming_the_culprit(case, stores, tmp_path, capsys):
    args, fragment = TRAIN_ERRORS[case]
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path / "run"), *args(stores))
    assert status == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_an_interrupted_prepare_leaves_nothing_train_accepts(tmp_path):
    """SIGKILL a prepare of the whole standard library at several moments: each time, no
    directory that opens as a dataset is left, and the next prepare completes."""
    out = tmp_path / "stdlib"
    command = [sys.executable, "-m", "jaxtrain", "data", "prepare", "--input", "{stdlib}/**/*.py", "--out", str(out)]
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, timeout=300)
    whole = time.time() - started
    store, corpus = token_store.open_store(out), load_corpus(("{stdlib}/**/*.py",), 0.05)
    assert store.train.num_tokens > 4 * token_store.SHARD_TOKENS  # several shards
    np.testing.assert_array_equal(store.train.read(np.array([0]), store.train.num_tokens)[0], corpus.train)
    os.system(f"rm -rf {out}")
    for fraction in (0.3, 0.6, 0.8, 0.95):
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * whole)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "metadata.json").exists():
            token_store.open_store(out)  # finished before the kill: a complete dataset
            os.system(f"rm -rf {out}")
            continue
        for candidate in [out, *tmp_path.glob(".stdlib.tmp-*")]:  # left as they are for the next prepare
            if candidate.exists():
                with pytest.raises(DataError, match="not a prepared dataset"):
                    token_store.open_store(candidate)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metadata.json").read_text())["files"] > 500
    assert not list(tmp_path.glob(".stdlib.tmp-*"))


def test_data_bench_reports_pipeline_throughput_and_memory(stores, capsys):
    status, out, _ = cli_in_process(capsys, "data", "bench", str(stores / "byte"), "--config", str(TINY),
                                    "--seconds", "1", "--no-train")
    report = json.loads(out)
    assert status == 0 and report["pipeline_tokens_per_s"] > 0 and report["batches"] > 0
    assert report["pipeline_tokens_per_s"] == pytest.approx(
        report["batches"] * 16 * 64 / report["seconds"]) and len(report["rss_bytes_samples"]) >= 3
    status, _, err = cli_in_process(capsys, "data", "bench", str(stores / "byte"), "--config", str(TINY),
                                    "--seconds", "0")
    assert status == 2 and "--seconds" in err


def test_a_directory_link_loop_and_a_file_link_are_read_once(tmp_path, capsys):
    """`ln -s . c/loop` once listed every file 41 times (loop/, loop/loop/, ...), at paths
    that hash into both splits; a file link to a listed file was read twice."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py")):
        shutil.copy(path, corpus)
    (corpus / "loop").symlink_to(".")
    (corpus / "again.py").symlink_to("decoder.py")
    status, out, err = cli_in_process(capsys, "data", "prepare", "--input", str(corpus), str(corpus / "*.py"),
                                      "--out", str(tmp_path / "ds"), "--val-fraction", "0.5")
    assert status == 0, err
    assert "skipped: 1 directory link not followed, 1 path to a file already listed" in out
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["files"] == 5 and meta["skipped"] == {"directory_links": 1, "duplicate_paths": 1}
    reference = prepare(["{stdlib}/json/*.py"], str(tmp_path / "reference"), val_fraction=0.5)
    assert meta["splits"] == reference["splits"] and meta["content_sha256"] == reference["content_sha256"]
    assert reference["splits"]["train"]["documents"] and reference["splits"]["val"]["documents"]


def test_a_second_prepare_of_one_output_refuses_while_the_first_writes(tmp_path, capsys):
    out = tmp_path / "ds"
    with StoreWriter(out) as first:
        status, _, err = cli_in_process(capsys, "data", "prepare", "--input", *TINY_INPUTS, "--out", str(out))
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert f"(held by `jaxtrain data prepare` (pid {os.getpid()}, host {socket.gethostname()}) since" in err
        assert f"--out {out}" in err
        with pytest.raises(DataError, match="another `jaxtrain data prepare`"):
            claim(out)  # two prepares past the first check at once: the claim decides
        assert [p.name for p in tmp_path.iterdir()] == [first.staging.name]  # untouched, nothing leaked
        assert json.loads((first.staging / token_store.MARKER).read_text())["pid"] == os.getpid()
    assert not list(tmp_path.iterdir())


def test_a_dead_writers_staging_is_cleared_by_the_next_prepare(tmp_path, capsys):
    out = tmp_path / "ds"
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                    "from jaxtrain.data.store_writer import StoreWriter; "
                    "StoreWriter(Path(sys.argv[1])).__enter__(); os._exit(0)", str(out)], cwd=REPO, check=True)
    assert [p.name for p in tmp_path.iterdir()] == [".ds.tmp-staging"]  # its writer is gone
    status, _, err = cli_in_process(capsys, "data", "prepare", "--input", *TINY_INPUTS, "--out", str(out))
    assert status == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    token_store.open_store(out)
