"""Schedule values at their boundaries and inside, against the closed forms."""

import math

import numpy as np
import pytest

from jaxtrain import schedules

PEAK, WARMUP, TOTAL, FINAL = 1e-2, 10, 100, 0.1


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_warmup_is_linear_from_step_zero():
    lr = values(schedules.cosine(PEAK, WARMUP, TOTAL, FINAL), range(WARMUP + 1))
    np.testing.assert_allclose(lr[:WARMUP], PEAK * np.arange(1, WARMUP + 1) / WARMUP, rtol=1e-6)
    assert lr[WARMUP] == pytest.approx(PEAK)


def test_cosine_boundaries_and_midpoint():
    s = schedules.cosine(PEAK, WARMUP, TOTAL, FINAL)
    assert float(s(WARMUP)) == pytest.approx(PEAK)
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert float(s(mid)) == pytest.approx(PEAK * FINAL + (PEAK - PEAK * FINAL) * 0.5, rel=1e-5)
    assert float(s(TOTAL)) == pytest.approx(PEAK * FINAL, rel=1e-5)
    for step in (23, 61, 87):
        p = (step - WARMUP) / (TOTAL - WARMUP)
        expected = PEAK * FINAL + (PEAK - PEAK * FINAL) * 0.5 * (1 + math.cos(math.pi * p))
        assert float(s(step)) == pytest.approx(expected, rel=1e-5)


def test_wsd_is_flat_then_linear_decay():
    s = schedules.wsd(PEAK, WARMUP, TOTAL, decay_fraction=0.2, final_fraction=FINAL)
    stable = values(s, range(WARMUP, 80))
    np.testing.assert_allclose(stable, PEAK, rtol=1e-6)
    assert float(s(90)) == pytest.approx(PEAK - (PEAK - PEAK * FINAL) * 0.5, rel=1e-5)
    assert float(s(TOTAL)) == pytest.approx(PEAK * FINAL, rel=1e-5)
    decay = values(s, range(80, TOTAL + 1))
    assert np.all(np.diff(decay) < 0)


CLOSED_FORMS = {  # WSD decay from PEAK to LOW at progress q, written out independently
    "linear": lambda q: LOW + (PEAK - LOW) * (1 - q),
    "cosine": lambda q: LOW + (PEAK - LOW) * (1 + math.cos(math.pi * q)) / 2,
    "1-sqrt": lambda q: LOW + (PEAK - LOW) * (1 - math.sqrt(q)),
    "exponential": lambda q: PEAK * (LOW / PEAK) ** q,
}
LOW = PEAK * FINAL


@pytest.mark.parametrize("shape", sorted(CLOSED_FORMS))
def test_wsd_decay_shapes_match_their_closed_forms(shape):
    s = schedules.wsd(PEAK, WARMUP, TOTAL, decay_fraction=0.3, final_fraction=FINAL, shape=shape)
    np.testing.assert_allclose(values(s, range(WARMUP, 70)), PEAK, rtol=1e-6)  # stable phase
    rng = np.random.default_rng(0)
    for step in [70, 100, *rng.integers(71, 100, size=5)]:  # boundaries and random points
        expected = CLOSED_FORMS[shape]((step - 70) / 30)
        assert float(s(step)) == pytest.approx(expected, rel=1e-5), (shape, step)


def test_constant_and_no_warmup():
    assert float(schedules.constant(PEAK, 0)(0)) == pytest.approx(PEAK)
    assert float(schedules.constant(PEAK, 0)(10_000)) == pytest.approx(PEAK)
    assert float(schedules.cosine(PEAK, 0, TOTAL, FINAL)(0)) == pytest.approx(PEAK)


def test_schedule_command_plots_and_exponential_decay_needs_a_floor(tmp_path, capsys):
    from conftest import TINY, cli_in_process

    png = tmp_path / "lr.png"
    wsd = ("schedule", str(TINY), "--set", "schedule.name=wsd", "--set", "schedule.decay_shape=exponential")
    status, out, err = cli_in_process(capsys, *wsd, "--out", str(png))
    assert status == 0 and png.stat().st_size > 10_000, err
    status, _, err = cli_in_process(capsys, *wsd, "--set", "schedule.final_lr_fraction=0", "--out", str(png))
    assert status == 2 and "schedule.final_lr_fraction" in err and err.count("\n") == 1
