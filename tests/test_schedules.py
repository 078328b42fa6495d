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


def test_constant_and_no_warmup():
    assert float(schedules.constant(PEAK, 0)(0)) == pytest.approx(PEAK)
    assert float(schedules.constant(PEAK, 0)(10_000)) == pytest.approx(PEAK)
    assert float(schedules.cosine(PEAK, 0, TOTAL, FINAL)(0)) == pytest.approx(PEAK)
