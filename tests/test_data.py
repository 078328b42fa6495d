"""Default corpus and grain pipeline: deterministic split, exact iterator resume, disjoint shards."""

import glob
import os

import numpy as np
import pytest

from jaxtrain.config.files import load_config
from jaxtrain.data import pipeline
from jaxtrain.data.corpus import is_val, expand_paths, load_corpus
from jaxtrain.data.files import list_files
from jaxtrain.data.tokenizer import ByteTokenizer

DOC_SEPARATOR = ByteTokenizer.eos_id  # byte 0 ends every document
from jaxtrain.config.errors import DataError
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources

from conftest import TINY


def _windows(source, seq_len, i):
    return source.train.read(np.array([i * seq_len]), seq_len + 1)[0]


def test_default_globs_find_the_stdlib_without_site_packages():
    files = expand_paths(("{stdlib}/**/*.py",))
    assert len(files) > 500
    assert any(path.endswith("/json/decoder.py") for _, path in files)
    assert not any("site-packages" in path for _, path in files)


def test_split_is_deterministic_disjoint_and_by_document(tiny_cfg):
    corpus = load_corpus(tuple(tiny_cfg.data.paths), tiny_cfg.data.val_fraction)
    assert corpus.n_train_docs > 0 and corpus.n_val_docs > 0
    files = expand_paths(tiny_cfg.data.paths)
    n_val = sum(is_val(path[len(root) + 1:], tiny_cfg.data.val_fraction) for root, path in files)
    assert n_val == corpus.n_val_docs
    assert np.count_nonzero(corpus.val == DOC_SEPARATOR) == corpus.n_val_docs
    assert np.count_nonzero(corpus.train == DOC_SEPARATOR) == corpus.n_train_docs
    # every document ends with the separator, right before the next document's start
    assert np.all(corpus.train[corpus.train_doc_starts[1:] - 1] == DOC_SEPARATOR)
    assert 1.0 < corpus.unigram_entropy() < np.log(256)


def test_windows_are_next_token_pairs(tiny_cfg):
    source = open_sources(tiny_cfg)[0]
    tokens = load_corpus(tuple(tiny_cfg.data.paths), tiny_cfg.data.val_fraction).train
    batch = next(pipeline.TrainBatches(tiny_cfg, [source]))
    assert batch.shape == (tiny_cfg.train.batch_size, tiny_cfg.data.seq_len + 1)
    T = tiny_cfg.data.seq_len
    for window in batch:  # every row is a contiguous slice starting on a window boundary
        starts = [s for s in range(0, len(tokens) - T, T) if np.array_equal(tokens[s:s + T + 1], window)]
        assert starts


def test_iterator_resumes_to_exactly_the_next_batches(tiny_cfg):
    sources = open_sources(tiny_cfg)
    uninterrupted = pipeline.TrainBatches(tiny_cfg, sources)
    expected = [next(uninterrupted) for _ in range(12)]
    first = pipeline.TrainBatches(tiny_cfg, sources)
    for _ in range(5):
        next(first)
    resumed = pipeline.TrainBatches(tiny_cfg, sources)
    resumed.set_state(first.get_state())
    for want in expected[5:]:
        np.testing.assert_array_equal(next(resumed), want)


def test_a_doubled_batch_size_continues_at_the_next_unread_window(tiny_cfg):
    sources = open_sources(tiny_cfg)
    small = pipeline.TrainBatches(tiny_cfg, sources)
    expected = [next(small) for _ in range(9)]  # batches of 16 windows
    first = pipeline.TrainBatches(tiny_cfg, sources)
    for _ in range(5):
        next(first)
    big_cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"batch_size": 32})})
    big = pipeline.TrainBatches(big_cfg, sources)
    big.set_state(first.get_state())
    np.testing.assert_array_equal(next(big), np.concatenate(expected[5:7]))
    again = pipeline.TrainBatches(big_cfg, sources)  # and a later resume at the same (new) size
    again.set_state(big.get_state())
    np.testing.assert_array_equal(next(again), np.concatenate(expected[7:9]))


@pytest.mark.parametrize("stored", [False, True], ids=["text corpus", "token store"])
def test_processes_read_disjoint_windows_covering_the_epoch(stored, tmp_path):
    cfg = load_config(TINY, ["train.batch_size=4", "data.seq_len=256"])
    if stored:
        prepare(list(cfg.data.paths), str(tmp_path / "store"), val_fraction=cfg.data.val_fraction)
        cfg = load_config(TINY, ["train.batch_size=4", "data.seq_len=256",
                                 f"data.sources=[{{path: '{tmp_path / 'store'}'}}]"])
    sources = open_sources(cfg)
    n, batch, local = pipeline.num_windows(sources[0].train, cfg.data.seq_len), 4, 2
    single = pipeline.train_dataset(cfg, sources, 0, 1)
    parts = [pipeline.train_dataset(cfg, sources, process, 2) for process in (0, 1)]
    epoch = [[], []]
    for i in range(-(-n // batch)):  # every batch that starts inside the first epoch
        # the processes' rows, stacked in process order, are the single-process global batch
        np.testing.assert_array_equal(np.concatenate([parts[0][i], parts[1][i]]), single[i])
        for process in (0, 1):
            rows = parts[process][i]
            assert len(rows) == local
            epoch[process] += [tuple(w) for j, w in enumerate(rows) if i * batch + process * local + j < n]
    assert not set(epoch[0]) & set(epoch[1])
    everything = {tuple(_windows(sources[0], cfg.data.seq_len, i)) for i in range(n)}
    assert set(epoch[0]) | set(epoch[1]) == everything and len(epoch[0]) + len(epoch[1]) == n


def test_validation_batches_are_fixed(tiny_cfg):
    source = open_sources(tiny_cfg)[0]
    a = pipeline.validation_batches(tiny_cfg, source)
    b = pipeline.validation_batches(tiny_cfg, source)
    assert len(a) == tiny_cfg.data.val_batches
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_paths_are_a_clear_error(tmp_path):
    cfg = load_config(TINY, [f"data.paths=['{tmp_path}/*.txt']"])
    with pytest.raises(DataError, match=r"no files match .*\*\.txt"):
        open_sources(cfg)


GLOBS = ["**/*.py", "*.py", "q?.py", "[qx]*.py", "**", ".*.py", "b/**/*", "*/*/*.txt", "*/c/*", ""]


def test_inputs_match_as_glob_does_but_read_each_file_once_through_links(tmp_path):
    """Without links, inputs list exactly what glob.glob(recursive=True) lists; a directory
    link loop (`ln -s .. b/loop`) and a file link add nothing, for data.paths runs too."""
    for name in ("x.py", "q1.py", "q2.py", ".dot.py", "b/y.py", "b/c/z.txt", "b/c/w.py", ".hidden/h.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n" * 20)
    patterns = [str(tmp_path / g) for g in GLOBS]
    for pattern in patterns:
        globbed = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert [path for _, path in expand_paths((pattern,))] == (globbed or _all_files(pattern)), pattern
    listed = {pattern: expand_paths((pattern,)) for pattern in patterns}
    corpus = load_corpus((str(tmp_path),), 0.5)
    (tmp_path / "b" / "loop").symlink_to("..")
    (tmp_path / "b" / "again.py").symlink_to("y.py")
    assert {pattern: expand_paths((pattern,)) for pattern in patterns} == listed
    assert list_files((str(tmp_path),)).skipped() == {"directory_links": 1, "duplicate_paths": 1}
    load_corpus.cache_clear()
    again = load_corpus((str(tmp_path),), 0.5)
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)


def _all_files(directory):
    """A directory input: every file below it, hidden ones left out (as DIR/**/* globs them)."""
    return sorted(p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(p))
