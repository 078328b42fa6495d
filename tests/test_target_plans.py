"""Collectives and refusals of steps compiled for real targets (`tests/test_targets.py` has
the shipped configs): each target's HLO against the analytic model, a plan that does not fit
refused in one line, and `--fit`'s plan compiling to fit. A file of its own so that
`make test`'s two workers share the compiles.
"""

import json

import pytest

from conftest import REPO
from test_targets import GPT350M, compiled, target_dry_run

ANALYTIC_WITHIN = 1.25  # compiled collective bytes / analytic model, either way

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", ["tpu-v5p-8", "h100x8"])
@pytest.mark.parametrize("mesh", [("mesh.fsdp=-1",), ("mesh.fsdp=-1", "mesh.tensor=2")], ids=["fsdp", "fsdp_tensor"])
def test_collectives_of_the_target_hlo_match_the_analytic_model(target, mesh):
    plan = compiled(GPT350M, target, "model.n_layers=4", "train.batch_size=16", *mesh)
    analytic, counted = plan["communication"]["analytic_by_kind"], plan["compiled"]["collectives"]
    total_a, total_c = sum(analytic.values()), sum(counted.values())
    assert 1 / ANALYTIC_WITHIN <= total_c / total_a <= ANALYTIC_WITHIN, (analytic, counted)
    assert counted["reduce-scatter"] > 0 and 1 / ANALYTIC_WITHIN <= counted["reduce-scatter"] / analytic[
        "reduce-scatter"] <= ANALYTIC_WITHIN, (analytic, counted)


def test_a_plan_that_does_not_fit_is_refused_and_fit_finds_one_that_does():
    request = ("--set=model.remat=none", "--set=train.batch_size=256")  # the shipped plan: dots_saveable, batch 64
    refused = target_dry_run(GPT350M, "tpu-v5p-8", "--compile", *request)
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = [ln for ln in refused.stderr.splitlines() if ln.startswith("jaxtrain: error:")]
    assert "--target tpu-v5p-8: the train step needs" in line and "95.74 GiB usable" in line, line
    assert "Ran out of memory" in line  # the compiler's own words
    fit = target_dry_run(GPT350M, "tpu-v5p-8", "--fit", "--json", *request)
    assert fit.returncode == 0, fit.stderr[-3000:]
    overrides = json.loads(fit.stdout)["overrides"].replace("--set ", "--set=").split()
    assert compiled(GPT350M, "tpu-v5p-8", *[o.removeprefix("--set=") for o in request + tuple(overrides)])[
        "compiled"]["fits"]


@pytest.mark.parametrize("target,mesh", [("tpu-v5p-8", "mesh.expert=4"), ("h100x8", "mesh.expert=8")])
def test_the_expert_all_to_all_of_the_target_hlo_is_the_analytic_model(target, mesh):
    """The shipped MoE config (docs/moe.md), 2 layers: each target compiler keeps the
    dispatch and combine as all-to-alls of the dropless capacity, byte for byte."""
    plan = compiled(REPO / "configs" / "moe350m.yaml", target, "model.n_layers=2", "train.batch_size=16", mesh)
    analytic, counted = plan["communication"]["analytic_by_kind"], plan["compiled"]["collectives"]
    assert counted["all-to-all"] == pytest.approx(analytic["all-to-all"], rel=0.01) and counted["all-to-all"] > 0
    assert 1 / ANALYTIC_WITHIN <= sum(counted.values()) / sum(analytic.values()) <= ANALYTIC_WITHIN, (analytic, counted)
    assert plan["compiled"]["fits"]
