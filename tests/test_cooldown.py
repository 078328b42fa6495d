"""`jaxtrain cooldown`: a decay branch from step k of a WSD run follows the decay from k on,
records its lineage, and leaves every file of the parent untouched."""

import hashlib
import json
import math

import pytest

from conftest import TINY, cli_env, cli_in_process, free_port, start_cli
from jaxtrain.config.files import load_config
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics

pytestmark = pytest.mark.slow

PEAK, FINAL = 3e-3, 0.1  # tiny.yaml's lr and the default final_lr_fraction


def snapshot(directory):
    return {p: (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wsd_parent(tmp_path_factory):
    """40 steps of WSD: stable until step 32, checkpoints at 20, 30, 40."""
    workdir = tmp_path_factory.mktemp("wsd_parent")
    run(load_config(TINY, ["schedule.name=wsd", "train.log_every=1"]), workdir, console=False)
    return workdir


def test_a_branch_from_step_20_decays_from_there_and_leaves_the_parent_alone(wsd_parent, tmp_path, capsys):
    before = snapshot(wsd_parent)
    branch = tmp_path / "cooldown"
    status, out, err = cli_in_process(capsys, "cooldown", str(wsd_parent), "--step", "20", "--decay", "10",
                                      "--shape", "1-sqrt", "--workdir", str(branch))
    assert status == 0, err
    rows = {r["step"]: r for r in read_metrics(branch / "metrics.jsonl")}
    parent_rows = {r["step"]: r for r in read_metrics(wsd_parent / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, 31))
    assert all(rows[s]["loss"] == parent_rows[s]["loss"] for s in range(1, 21))  # the shared history
    low = PEAK * FINAL
    for n in range(21, 31):  # row n logs the LR of the update from step n-1 to n
        q = (n - 1 - 20) / 10
        assert rows[n]["lr"] == pytest.approx(low + (PEAK - low) * (1 - math.sqrt(q)), rel=1e-5), n
    lineage = json.loads((branch / "lineage.json").read_text())
    assert (lineage["parent"], lineage["step"], lineage["decay_steps"]) == (str(wsd_parent), 20, 10)
    assert snapshot(wsd_parent) == before
    again = cli_in_process(capsys, "cooldown", str(wsd_parent), "--step", "20", "--decay", "10",
                           "--shape", "cosine", "--workdir", str(branch))
    assert again[0] == 2 and "decay_shape='1-sqrt'" in again[2]  # another branch: refused


def test_two_processes_branch_once_and_train_the_branch_together(wsd_parent, tmp_path):
    """Each process of a group checks the branch; process 0 alone writes it (two writers
    would race for the same temporary directory), then both train it."""
    branch, port = tmp_path / "cooldown", free_port()
    procs = [start_cli("cooldown", str(wsd_parent), "--step", "20", "--decay", "10", "--workdir", str(branch),
                       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                       env=cli_env(4)) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert sum(out.count("final val_loss") for out, _ in outputs) == 1  # process 0 speaks for the run
    assert [r["step"] for r in read_metrics(branch / "metrics.jsonl")][-1] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cooldown"]  # no temporary directory left


def test_a_cooldown_into_an_owned_workdir_is_one_line_naming_the_holder(wsd_parent, workdir_holder, capsys):
    branch, pid = workdir_holder()
    before = snapshot(branch)
    status, _, err = cli_in_process(capsys, "cooldown", str(wsd_parent), "--step", "20", "--decay", "10",
                                    "--workdir", str(branch))
    assert status == 2 and err.count("\n") == 1 and f"pid {pid}," in err, err
    assert snapshot(branch) == before


def test_two_cooldowns_into_one_new_directory_train_it_once(wsd_parent, tmp_path):
    branch = tmp_path / "cooldown"
    args = ("cooldown", str(wsd_parent), "--step", "20", "--decay", "10", "--workdir", str(branch))
    procs = [start_cli(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outputs
    refused = next(err for p, (_, err) in zip(procs, outputs) if p.returncode == 2)
    assert refused.count("\n") == 1 and "held by `jaxtrain cooldown`" in refused, refused
    assert [r["step"] for r in read_metrics(branch / "metrics.jsonl")] == list(range(1, 31))


def test_a_preempted_branch_resumes_by_rerunning_its_command_after_the_parent_dropped_its_step(
        wsd_parent, tmp_path, capsys):
    import shutil

    from jaxtrain.tools.cooldown import create_branch

    parent, branch = tmp_path / "parent", tmp_path / "cooldown"
    shutil.copytree(wsd_parent, parent)
    cfg, _ = create_branch(parent, 20, 10, branch)
    run(cfg, branch, stop_after=25, console=False)  # preempted after step 25
    shutil.rmtree(parent / "checkpoints" / "20")  # the parent trains on and keep=3 drops step 20
    status, out, err = cli_in_process(capsys, "cooldown", str(parent), "--step", "20", "--decay", "10",
                                      "--workdir", str(branch))
    assert status == 0 and "resumed from checkpoint at step 25" in out, err


@pytest.mark.parametrize("args, culprit", [
    (("--step", "40", "--decay", "5"), "the parent already decays from step 32"),
    (("--step", "25", "--decay", "5"), "--step 25: no checkpoint at that step"),
    (("--step", "20", "--decay", "1.5"), "--decay 1.5: expected a number of steps"),
    (("--step", "20", "--decay", "5", "--final-lr-fraction", "2"), "--final-lr-fraction 2: must be a number in [0, 1]"),
    # the branch continues the parent's checkpoint: its identity keys (config/schema.py) stay
    (("--step", "20", "--decay", "5", "--set", "data.seq_len=32"), "config key 'data.seq_len': is 32"),
    (("--step", "20", "--decay", "5", "--set", "optimizer.name=muon"), "config key 'optimizer.name'"),
])
def test_bad_branches_are_one_line_and_write_nothing(wsd_parent, tmp_path, capsys, args, culprit):
    status, _, err = cli_in_process(capsys, "cooldown", str(wsd_parent), *args, "--workdir", str(tmp_path / "b"))
    assert status == 2 and err.count("\n") == 1 and culprit in err, err
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "b").exists()


def test_resuming_in_warmup_stable_and_decay_continues_the_same_lr_sequence(wsd_parent, tmp_path):
    cfg = load_config(TINY, ["schedule.name=wsd", "train.log_every=1"])
    for stop in (3, 20, 35):  # warmup ends at 5, decay starts at 32
        assert run(cfg, tmp_path, stop_after=stop, console=False).step == stop
    run(cfg, tmp_path, console=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs == [r["lr"] for r in read_metrics(wsd_parent / "metrics.jsonl")] and len(lrs) == 40


def rewarm_config(parent, *sets):
    return load_config(TINY, [f"train.init_from={{workdir: {parent}, step: 30, optimizer: {sets[0]}}}", *sets[1:]])


@pytest.mark.parametrize("optimizer", [False, True])
def test_rewarm_starts_from_the_parents_params_and_optionally_its_optimizer_state(wsd_parent, optimizer):
    import jax
    import numpy as np

    from conftest import assert_same_params
    from jaxtrain.run import rewarm
    from jaxtrain.model import sharding
    from jaxtrain import step as ts
    from jaxtrain.run.checkpoint import Checkpointer

    cfg = rewarm_config(wsd_parent, str(optimizer).lower())
    mesh = sharding.make_mesh(cfg.mesh)
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    fresh, target = steps.init(), steps.abstract_state()
    notes = []
    state = rewarm.initial_state(cfg, spec.table, fresh, target, notes.append)
    ckpt = Checkpointer(wsd_parent / "checkpoints", cfg.checkpoint, read_only=True)
    parent_state = ckpt.restore(30, target)[0]
    ckpt.close()
    assert_same_params(jax.device_get(state.params), jax.device_get(parent_state.params))
    expected_opt = parent_state.opt_state if optimizer else steps.init().opt_state
    for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expected_opt), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(state.step) == 0 and "step 30" in notes[0]


def test_a_rewarm_run_warms_up_again_on_other_data_and_leaves_the_parent_alone(wsd_parent, tmp_path, capsys):
    before = snapshot(wsd_parent)
    parent_rows = read_metrics(wsd_parent / "metrics.jsonl")
    args = ("train", str(TINY), "--workdir", str(tmp_path / "rewarm"),
            "--set", f"train.init_from={{workdir: {wsd_parent}, step: 30}}", "--set", "train.steps=10",
            "--set", "train.log_every=1", "--set", "schedule.name=constant",  # warmup 5 steps back to the peak
            "--set", "data.paths=['{stdlib}/http/*.py', '{stdlib}/xml/**/*.py']")  # switch data
    status, out, err = cli_in_process(capsys, *args)
    assert status == 0, err
    assert f"initialized from {wsd_parent} checkpoint at step 30 (params)" in out
    rows = read_metrics(tmp_path / "rewarm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[-1]["tokens"] == 10 * 16 * 64
    assert [r["lr"] for r in rows[:6]] == pytest.approx([PEAK * k / 5 for k in (1, 2, 3, 4, 5, 5)])
    assert rows[0]["loss"] < parent_rows[0]["loss"] - 1.0  # trained params, not a random init
    assert snapshot(wsd_parent) == before
    status, out, err = cli_in_process(capsys, *args)  # rerun: resumes its own checkpoint
    assert status == 0 and "resumed from checkpoint at step 10" in out and "initialized" not in out


def test_a_rewarm_from_another_model_or_a_missing_step_names_the_key(wsd_parent, tmp_path, capsys):
    base = ("train", str(TINY), "--workdir", str(tmp_path / "bad"))
    status, _, err = cli_in_process(capsys, *base, "--set", f"train.init_from={{workdir: {wsd_parent}}}",
                                    "--set", "model.d_model=128")
    assert status == 2 and "model.d_model" in err and err.count("\n") == 1
    status, _, err = cli_in_process(capsys, *base, "--set", f"train.init_from={{workdir: {wsd_parent}, step: 7}}")
    assert status == 2 and "train.init_from.step" in err and "[20, 30, 40]" in err
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())


def test_a_branch_of_a_power_run_decays_from_the_power_laws_value(tmp_path, capsys):
    parent = tmp_path / "power"
    run(load_config(TINY, ["schedule.name=power", "schedule.power_a=0.01", "train.log_every=1"]), parent,
        console=False)  # the law drops below the peak from step ~3; its own decay starts at 32
    status, _, err = cli_in_process(capsys, "cooldown", str(parent), "--step", "20", "--decay", "10",
                                    "--workdir", str(tmp_path / "branch"))
    assert status == 0, err
    parent_lr = {r["step"]: r["lr"] for r in read_metrics(parent / "metrics.jsonl")}
    branch_lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "branch" / "metrics.jsonl")}
    start = 16 * 0.01 * (20 * 1024) ** -0.51  # batch * a * n^b at the branch point
    assert parent_lr[21] == pytest.approx(start, rel=1e-6) and start < PEAK
    expected = [start * (FINAL + (1 - FINAL) * (1 - j / 10)) for j in range(10)]
    assert [branch_lr[20 + j + 1] for j in range(10)] == pytest.approx(expected, rel=1e-6)
    assert all(branch_lr[s] == parent_lr[s] for s in range(1, 21))
