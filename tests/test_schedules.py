"""Schedule values at their boundaries and at random points, against closed forms written
out here independently; lengths in steps, tokens and fractions; resumes replay the LR."""

import math

import numpy as np
import pytest
from conftest import TINY, figure_panels

from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import load_config
from jaxtrain.optim import schedules
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics

PEAK, WARMUP, TOTAL, FINAL, BATCH, SEQ = 1e-2, 10, 100, 0.1, 4, 8
TAU = BATCH * SEQ  # tokens per step
LOW = PEAK * FINAL


def schedule(name, *sets):
    cfg = load_config(TINY, [f"optimizer.lr={PEAK}", f"schedule.name={name}", f"schedule.warmup_steps={WARMUP}",
                             f"schedule.final_lr_fraction={FINAL}", f"train.steps={TOTAL}",
                             f"train.batch_size={BATCH}", f"data.seq_len={SEQ}", *sets])
    lr = schedules.make_schedule(cfg)
    return lambda step: float(lr(step * TAU))


def check_points(lr, closed_form, first, last):
    """Both boundaries and five seeded random steps in between."""
    rng = np.random.default_rng(0)
    for step in [first, last, *rng.integers(first + 1, last, size=5)]:
        assert lr(step) == pytest.approx(closed_form(step), rel=1e-9), step


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd"])
def test_warmup_is_linear_from_step_zero_up_to_the_peak(name):
    lr = schedule(name)
    np.testing.assert_allclose([lr(s) for s in range(WARMUP)], PEAK * np.arange(1, WARMUP + 1) / WARMUP)
    assert lr(WARMUP) == pytest.approx(PEAK)


def test_constant_linear_and_cosine_match_their_closed_forms():
    check_points(schedule("constant"), lambda s: PEAK, WARMUP, 10_000)
    progress = lambda s: (s - WARMUP) / (TOTAL - WARMUP)
    check_points(schedule("linear"), lambda s: LOW + (PEAK - LOW) * (1 - progress(s)), WARMUP, TOTAL)
    check_points(schedule("cosine"), lambda s: LOW + (PEAK - LOW) * (1 + math.cos(math.pi * progress(s))) / 2,
                 WARMUP, TOTAL)
    assert schedule("cosine")(TOTAL + 50) == pytest.approx(LOW)  # past the end: stays at the floor


DECAY_FORMS = {  # WSD decay from PEAK to LOW at progress q
    "linear": lambda q: LOW + (PEAK - LOW) * (1 - q),
    "cosine": lambda q: LOW + (PEAK - LOW) * (1 + math.cos(math.pi * q)) / 2,
    "1-sqrt": lambda q: LOW + (PEAK - LOW) * (1 - math.sqrt(q)),
    "exponential": lambda q: PEAK * (LOW / PEAK) ** q,
}


@pytest.mark.parametrize("shape", sorted(DECAY_FORMS))
def test_wsd_is_flat_then_decays_in_its_shape(shape):
    lr = schedule("wsd", "schedule.decay_fraction=0.3", f"schedule.decay_shape={shape}")
    check_points(lr, lambda s: PEAK, WARMUP, 70)
    check_points(lr, lambda s: DECAY_FORMS[shape]((s - 70) / 30), 70, TOTAL)


def test_power_is_capped_then_follows_the_power_law_then_decays():
    a, b = 0.05, -0.51  # a small enough that the law drops below the peak within the run
    power = lambda s: min(PEAK, BATCH * a * (s * TAU) ** b)
    lr = schedule("power", "schedule.warmup_steps=0", f"schedule.power_a={a}", f"schedule.power_b={b}",
                  "schedule.decay_steps=20")
    assert lr(0) == PEAK  # n = 0: capped at the peak
    crossover = (PEAK / (BATCH * a)) ** (1 / b) / TAU  # the step where batch * a * n^b = peak
    assert 1 < crossover < 80
    check_points(lr, power, 1, 80)
    assert lr(int(crossover) - 1) == PEAK and lr(int(crossover) + 1) < PEAK
    start = power(80)
    check_points(lr, lambda s: start * FINAL + (start - start * FINAL) * (1 - (s - 80) / 20), 80, TOTAL)


def test_power_warmup_rises_to_the_power_value():
    lr = schedule("power", "schedule.power_a=0.01")  # power value below the peak at the warmup's end
    target = min(PEAK, BATCH * 0.01 * (WARMUP * TAU) ** -0.51)
    assert target < PEAK
    np.testing.assert_allclose([lr(s) for s in range(WARMUP)], target * np.arange(1, WARMUP + 1) / WARMUP)


def test_lengths_in_steps_tokens_and_fractions_agree():
    base = schedule("wsd", "schedule.decay_fraction=0.3")
    for sets in [("schedule.warmup_steps=0", f"schedule.warmup_tokens={WARMUP * TAU}", "schedule.decay_steps=30"),
                 ("schedule.warmup_steps=0", f"schedule.warmup_fraction={WARMUP / TOTAL}",
                  f"schedule.decay_tokens={30 * TAU}")]:
        other = schedule("wsd", *sets)
        np.testing.assert_allclose([other(s) for s in range(TOTAL)], [base(s) for s in range(TOTAL)], rtol=1e-12)


def test_a_schedule_in_tokens_is_the_same_function_of_tokens_at_another_batch_size():
    sets = ("schedule.warmup_steps=0", f"schedule.warmup_tokens={WARMUP * TAU}", f"schedule.decay_tokens={30 * TAU}")
    cfg = lambda batch, steps: load_config(TINY, ["schedule.name=wsd", f"train.batch_size={batch}",
                                                  f"train.steps={steps}", f"data.seq_len={SEQ}", *sets])
    small, big = schedules.make_schedule(cfg(BATCH, TOTAL)), schedules.make_schedule(cfg(2 * BATCH, TOTAL // 2))
    tokens = np.arange(0, TOTAL * TAU, 2 * TAU)  # where both batch sizes have a step boundary
    after_warmup = tokens >= WARMUP * TAU  # (the warmup's first point counts this step's tokens)
    np.testing.assert_allclose(big(tokens)[after_warmup], small(tokens)[after_warmup], rtol=1e-12)


def test_a_length_given_twice_or_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="warmup"):
        load_config(TINY, ["schedule.warmup_steps=5", "schedule.warmup_tokens=100"])
    with pytest.raises(ConfigError, match="schedule.warmup_tokens"):
        load_config(TINY, ["schedule.warmup_steps=0", "schedule.warmup_tokens=1000000000"])


@pytest.mark.slow
def test_resuming_mid_warmup_mid_stable_and_mid_decay_replays_the_same_lr(tmp_path):
    sets = ["schedule.name=wsd", "schedule.warmup_steps=10", "schedule.decay_fraction=0.25",
            "schedule.decay_shape=1-sqrt", "train.log_every=1", "train.eval_every=40"]
    cfg = load_config(TINY, sets)
    run(cfg, tmp_path / "whole", console=False)
    for stop in (5, 20, 35):  # warmup ends at 10, decay starts at 30
        run(cfg, tmp_path / "resumed", stop_after=stop, console=False)
    run(cfg, tmp_path / "resumed", console=False)
    lrs = lambda name: [(r["step"], r["lr"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert lrs("resumed") == lrs("whole") and len(lrs("whole")) == 40
    expected = schedules.lr_per_step(cfg).astype(np.float32)
    np.testing.assert_array_equal([lr for _, lr in lrs("whole")], expected)


@pytest.mark.slow
def test_doubling_the_batch_on_resume_keeps_the_lr_a_function_of_tokens(tmp_path):
    """20 steps of 16 x 64 tokens, then 10 of 32 x 64: the same 40,960-token budget as 40
    steps of 16. The LR of every step is the schedule at the tokens seen before it."""
    sets = ["schedule.name=wsd", "schedule.warmup_steps=0", f"schedule.warmup_tokens={5 * 1024}",
            "schedule.decay_fraction=0.5", "train.log_every=1", "train.eval_every=100"]
    small = load_config(TINY, [*sets, "train.steps=40"])
    run(small, tmp_path, stop_after=20, console=False)
    run(load_config(TINY, [*sets, "train.steps=30", "train.batch_size=32"]), tmp_path, console=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    tokens = [r["tokens"] for r in rows]
    assert tokens == [1024 * k for k in range(1, 21)] + [20 * 1024 + 2048 * k for k in range(1, 11)]
    before = np.array([0, *tokens[:-1]])
    expected = schedules.make_schedule(small)(before).astype(np.float32)  # the same budget in tokens
    np.testing.assert_array_equal([r["lr"] for r in rows], expected)
    assert rows[19]["lr"] == rows[20]["lr"] > rows[21]["lr"] > rows[-1]["lr"]  # decays from token 20,480 on


def test_schedule_command_plots_and_exponential_decay_needs_a_floor(tmp_path, capsys):
    from conftest import cli_in_process

    png = tmp_path / "lr.png"
    wsd = ("schedule", str(TINY), "--set", "schedule.name=wsd", "--set", "schedule.decay_shape=exponential")
    status, out, err = cli_in_process(capsys, *wsd, "--out", str(png))
    assert status == 0, err
    (panel,) = figure_panels(png)  # the lr of every step
    assert panel["curves"] == {"learning rate": load_config(TINY).train.steps} and panel["x"] == "step"
    assert panel["title"].startswith("wsd (exponential decay)")
    status, _, err = cli_in_process(capsys, *wsd, "--set", "schedule.final_lr_fraction=0", "--out", str(png))
    assert status == 2 and "schedule.final_lr_fraction" in err and err.count("\n") == 1
