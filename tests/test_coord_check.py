"""The muP coordinate check on CPU: activations stay width-independent under muP, and the
logits blow up with width under SP after the first update."""

import json

import pytest

from conftest import REPO, figure_panels, run_in_process
from jaxtrain.config.files import load_config
from jaxtrain.tools.coord_check import coord_check

pytestmark = pytest.mark.slow
WIDTHS = [64, 128, 256]  # 4x in width: enough for a slope, and width 512 alone cost half the file
STEPS = 3
SETTINGS = ["data.paths=['{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/asyncio/*.py']",
            "data.val_fraction=0.1"]


def check(name):
    cfg = load_config(REPO / "configs" / "mup_sweep.yaml", [*SETTINGS, f"parametrization.name={name}"])
    return coord_check(cfg, WIDTHS, None, STEPS)


def test_mup_activations_and_logits_are_flat_in_width():
    report = check("mup")
    for step in range(STEPS + 1):
        for name, slope in report["slopes"][str(step)].items():
            if name == "logits" and step == 0:
                assert slope is None  # zero-initialized readout: the logits start at exactly 0
                continue
            assert abs(slope) <= 0.15, (step, name, slope)


def test_sp_logits_grow_with_width_after_the_first_update():
    slopes = check("sp")["slopes"]
    assert slopes["1"]["logits"] > 0.5
    assert max(slopes[str(STEPS)][n] for n in slopes[str(STEPS)] if n.startswith("block")) > 0.5


def test_cli_writes_json_and_plot(tmp_path, capsys):
    proc = run_in_process(capsys, "coord-check", str(REPO / "configs" / "mup_sweep.yaml"), "--widths", "32,64",
                   "--depths", "1,2", "--steps", "1", "--out", str(tmp_path), *sum((["--set", s] for s in SETTINGS), []))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "coord_check.json").read_text())
    assert {(r["width"], r["depth"], r["step"]) for r in report["records"]} == \
        {(w, d, t) for w in (32, 64) for d in (1, 2) for t in (0, 1)}
    for depth in (1, 2):  # a panel per recorded activation, a curve per step over both widths
        panels = figure_panels(tmp_path / f"coord_check_L{depth}.png")
        recorded = next(r["rms"] for r in report["records"] if r["depth"] == depth)
        assert sorted(p["title"].split()[0] for p in panels) == sorted(recorded)
        assert all(p["curves"] == {"t=0": 2, "t=1": 2} for p in panels), panels
    bad = run_in_process(capsys, "coord-check", str(REPO / "configs" / "mup_sweep.yaml"), "--widths", "64,x", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--widths" in bad.stderr
