"""Mixtures of prepared datasets: weights per phase, epoch counters, exact resume through a
checkpoint, per-source validation, a BPE run end to end."""

import json
import random

import numpy as np
import pytest

from conftest import TINY
from jaxtrain.config.files import load_config
from jaxtrain.data import pipeline
from jaxtrain.data.mixture import Mixture, counts, integer_proportions
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import TIMING_KEYS, read_metrics


def _text_files(directory, alphabet, n_files, seed):
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for i in range(n_files):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(300)]
        (directory / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return str(directory / "*.txt")


@pytest.fixture(scope="module")
def lower_upper(tmp_path_factory):
    """Two byte datasets whose windows tell their source: lowercase words and uppercase words."""
    root = tmp_path_factory.mktemp("mix")
    prepare([_text_files(root / "a", "abcdefghij", 60, 0)], str(root / "lower"), val_fraction=0.2)
    prepare([_text_files(root / "b", "ABCDEFGHIJ", 30, 1)], str(root / "upper"), val_fraction=0.2)
    return root


def _mix_config(root, *overrides, weights=(0.7, 0.3)):
    sources = (f"data.sources=[{{path: '{root / 'lower'}', weight: {weights[0]}}}, "
               f"{{path: '{root / 'upper'}', weight: {weights[1]}}}]")
    return load_config(TINY, [sources, *overrides])


def test_counts_follow_the_proportions_at_every_prefix():
    props = integer_proportions([0.5, 0.3, 0.2])
    assert props == (5, 3, 2)
    for n in range(1, 500):
        c = counts(n, props)
        assert sum(c) == n
        assert all(abs(ci - n * p / 10) <= len(props) - 1 for ci, p in zip(c, props))
    mixture = Mixture([0, 100], [[0.5, 0.5], [0.0, 1.0]])
    assert mixture.windows_read(300) == [50, 250]
    assert [mixture[k] for k in (100, 101)] == [(1, 50), (1, 51)]


def test_every_weight_keeps_its_proportion_and_none_divides_by_zero():
    # 0.0004 is below 1/2000, so at denominators <= 1000 it rounded to 0: never read
    assert integer_proportions([1.0, 0.0004]) == (2500, 1)
    mixture = Mixture([0], [[1.0, 0.0004]])
    assert mixture.windows_read(2501) == [2500, 1]
    assert mixture[2500] == (1, 0)
    # both tiny: the ratio 4:3 survives instead of 0:0 (gcd 0, ZeroDivisionError)
    assert integer_proportions([0.0004, 0.0003]) == (4, 3)
    assert integer_proportions([0.0, 1e-6, 1.0]) == (0, 1, 10**6)
    # weights written with three decimals keep their proportions exactly
    assert integer_proportions([0.7, 0.3]) == (7, 3) and integer_proportions([3, 1]) == (3, 1)
    # just above 1/2000 a denominator of 1000 gave 0.0005 and 0.0006 each 1/1000 (2x, 1.7x)
    assert integer_proportions([0.0005, 1.0]) == (1, 2000) and integer_proportions([0.0006, 1.0]) == (3, 5000)
    for weight in (1e-7, 3.3e-5, 0.00049, 0.00051, 0.000777, 0.0123, 0.3333, 0.9999, 2.5, 123.456):
        small, one = integer_proportions([weight, 1.0])
        assert small / one == pytest.approx(weight, rel=5e-4), weight
    with pytest.raises(ValueError, match="not all 0"):
        integer_proportions([0.0, 0.0])


def test_mixture_weights_are_honoured_in_each_phase(lower_upper):
    cfg = _mix_config(lower_upper, "data.phases=[{start_step: 50, weights: {lower: 0.2, upper: 0.8}}]",
                      "train.batch_size=16")
    batches = pipeline.TrainBatches(cfg, open_sources(cfg))
    upper_rows = [int(sum(np.any((row >= ord("A")) & (row <= ord("J"))) for row in next(batches)))
                  for _ in range(100)]
    # stated tolerance: within 1% of the weight over 50 batches of 16 windows (exact up to one window)
    assert abs(sum(upper_rows[:50]) / 800 - 0.3) <= 0.01
    assert abs(sum(upper_rows[50:]) / 800 - 0.8) <= 0.01


def test_a_source_read_past_max_epochs_is_warned_about_once_per_pass(lower_upper):
    cfg = _mix_config(lower_upper, "data.max_epochs=1.5", "data.seq_len=256", "train.batch_size=8", weights=(1, 1))
    warnings = []
    batches = pipeline.TrainBatches(cfg, open_sources(cfg), warn=warnings.append)
    per_pass = batches.windows[1] / (8 * 0.5)  # batches per pass over the (smaller) upper-case source
    for _ in range(int(2.5 * per_pass) + 1):
        next(batches)
    state = batches.get_state()["sources"]
    assert 2.0 < state["upper"]["epochs"] < 3.0 and state["lower"]["epochs"] < 1.5
    assert len(warnings) == 2 and all("'upper'" in w and "data.max_epochs=1.5" in w for w in warnings)
    assert "pass 2" in warnings[0] and "pass 3" in warnings[1]


def test_two_processes_split_a_mixed_packed_stream_without_overlap(lower_upper):
    cfg = _mix_config(lower_upper, "data.packing=true", "train.batch_size=8")
    sources = open_sources(cfg)
    single = pipeline.train_dataset(cfg, sources, 0, 1)
    parts = [pipeline.train_dataset(cfg, sources, p, 2) for p in (0, 1)]
    seen = [set(), set()]
    for i in range(40):
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(np.concatenate([parts[0][i][key], parts[1][i][key]]), single[i][key])
        for p in (0, 1):
            seen[p] |= {row.tobytes() for row in parts[p][i]["tokens"]}
    assert not seen[0] & seen[1]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.mark.slow
def test_a_bpe_mixture_resumes_exactly_and_logs_per_source_validation(tmp_path):
    """Two BPE datasets sharing one tokenizer, packed, with a phase: a run stopped at step
    12 and resumed from its checkpoint logs exactly the rows of an uninterrupted run."""
    a, b = tmp_path / "code", tmp_path / "mail"
    prepare(["{stdlib}/json/*.py", "{stdlib}/asyncio/*.py"], str(a), "bpe:512", val_fraction=0.1)
    prepare(["{stdlib}/email/*.py"], str(b), str(a / "tokenizer.json"), val_fraction=0.2)
    sources = f"data.sources=[{{path: '{a}', weight: 3}}, {{path: '{b}'}}]"
    cfg = load_config(TINY, [sources, "model.vocab_size=512", "data.packing=true", "train.steps=24",
                             "train.eval_every=12", "checkpoint.every_steps=12",
                             "data.phases=[{start_fraction: 0.5, weights: {code: 1, mail: 1}}]"])
    whole = run(cfg, tmp_path / "whole", console=False)
    run(cfg, tmp_path / "split", stop_after=12, console=False)
    resumed = run(cfg, tmp_path / "split", console=False)
    assert resumed.resumed_from == 12 and resumed.val_loss == whole.val_loss
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert without_timing(read_metrics(tmp_path / "split" / "metrics.jsonl")) == without_timing(rows)
    last = rows[-1]
    assert {"val_loss", "val_bits_per_byte", "val_loss/code", "val_loss/mail"} <= last.keys()
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss/code"] + 0.25 * last["val_loss/mail"])
    # bits per byte: nats/token / ln 2 * tokens per byte, well below the byte-level figure
    assert last["val_bits_per_byte"] < last["val_loss"] / np.log(2) * 0.6
    data_state = json.loads(next((tmp_path / "whole" / "checkpoints" / "24").glob("data*/*")).read_text())
    assert data_state["sources"]["code"]["windows_read"] == 12 * 16 * 3 // 4 + 12 * 16 // 2
