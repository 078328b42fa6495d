"""Never lose work, one process: SIGTERM within the grace period, SIGKILL at random
moments (also mid-save), an unreadable newest checkpoint, a failed save, and a checkpoint
written on 8 devices resumed on 4 with other mesh axes. Every run here is the CLI, the way
a scheduler starts it, and ends compared with one uninterrupted run (`cli_reference`)."""

import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (REFERENCE_SETTINGS, REPO, TINY, assert_same_params, cli_env, final_params, logged_rows,
                      run_cli, start_cli, wait_for_step)

pytestmark = pytest.mark.slow

GRACE = 30  # seconds, train.grace_period_sec of the SIGTERM test


def train_args(workdir, *extra):
    return ("train", str(TINY), "--workdir", str(workdir), *REFERENCE_SETTINGS, *extra)


def complete_checkpoints(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def files_of(directory):
    return [p for p in directory.rglob("*") if p.is_file()]


def resumed_step(output: str) -> int | None:
    found = re.search(r"resumed from checkpoint at step (\d+)", output)
    return int(found.group(1)) if found else None


def copy_run(reference, target, keep_steps):
    shutil.copytree(reference, target)
    for step in complete_checkpoints(target):
        if step not in keep_steps:
            shutil.rmtree(target / "checkpoints" / str(step))
    return target


def assert_same_losses(workdir, reference, rtol=0.0):
    got = {r["step"]: r for r in logged_rows(workdir)}
    want = {r["step"]: r for r in logged_rows(reference)}
    assert sorted(got) == sorted(want) == list(range(1, 41))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([got[s][key] for s in want], [want[s][key] for s in want], rtol=rtol, err_msg=key)


def test_sigterm_saves_within_the_grace_period_and_the_same_command_resumes_there(cli_reference, tmp_path):
    args = train_args(tmp_path, "--set", f"train.grace_period_sec={GRACE}")
    proc = start_cli(*args)
    wait_for_step(proc, tmp_path, 10)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=GRACE + 30)
    assert time.monotonic() - signalled < GRACE, "exit took longer than the grace period"
    assert proc.returncode == 143, err
    stopped = int(re.search(r"stopped by signal 15 after step (\d+)", err).group(1))
    assert 10 <= stopped < 40 and stopped in complete_checkpoints(tmp_path)  # off the 10-step interval too
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert resumed_step(rerun.stdout + rerun.stderr) == stopped
    assert_same_params(final_params(tmp_path), final_params(cli_reference))


def kill_at_random_step(proc, workdir, rng) -> None:
    start = logged_rows(workdir)[-1]["step"] if logged_rows(workdir) else 0
    wait_for_step(proc, workdir, start + rng.randint(2, 8))
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()


def kill_during_a_save(proc, workdir) -> None:
    """SIGKILL while orbax's temporary checkpoint directory exists (a save in flight)."""
    checkpoints, deadline = workdir / "checkpoints", time.time() + 240
    in_flight = lambda: {p.name for p in checkpoints.iterdir() if "tmp" in p.name} if checkpoints.exists() else set()
    left_by_an_earlier_kill = in_flight()
    while not in_flight() - left_by_an_earlier_kill:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.001)
    proc.kill()


def test_sigkill_anywhere_then_rerunning_ends_bitwise_equal_to_an_uninterrupted_run(cli_reference, tmp_path):
    rng = random.Random(20261123)
    args = train_args(tmp_path, "--set", "checkpoint.every_steps=5")  # saves often: kills hit saves
    interruptions = [lambda p: kill_at_random_step(p, tmp_path, rng),
                     lambda p: kill_during_a_save(p, tmp_path),
                     lambda p: kill_at_random_step(p, tmp_path, rng)]
    for interrupt in interruptions:
        before = complete_checkpoints(tmp_path) if (tmp_path / "checkpoints").exists() else []
        proc = start_cli(*args)
        interrupt(proc)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert resumed_step(out + err) == (before[-1] if before else None)  # newest complete one
    # a stop whose checkpoint cannot finish within the grace period exits 124 and loses nothing
    before = complete_checkpoints(tmp_path)
    proc = start_cli(*args, "--set", "train.grace_period_sec=0.001")
    started = proc.stdout.readline()  # the first line: the run is set up and resuming
    assert resumed_step(started) == before[-1], started
    wait_for_step(proc, tmp_path, before[-1] + 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 124 and "grace period of 0.001 s" in err, err
    before = complete_checkpoints(tmp_path)
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr
    assert resumed_step(final.stdout + final.stderr) == before[-1]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()]  # tmp dirs cleaned
    assert_same_params(final_params(tmp_path), final_params(cli_reference))
    assert_same_losses(tmp_path, cli_reference)


def test_an_unreadable_newest_checkpoint_is_skipped_with_a_warning(cli_reference, tmp_path):
    workdir = copy_run(cli_reference, tmp_path / "run", keep_steps=(30, 40))
    state_files = sorted(files_of(workdir / "checkpoints" / "40" / "state"), key=lambda p: p.stat().st_size)
    with state_files[-1].open("r+b") as largest:  # truncate the biggest array file
        largest.truncate(1000)
    rerun = run_cli(*train_args(workdir))
    assert rerun.returncode == 0, rerun.stderr
    warnings = [line for line in rerun.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checkpoint at step 40 is unreadable" in warnings[0], rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert resumed_step(rerun.stdout + rerun.stderr) == 30
    assert [p.name.split(".")[0] for p in (workdir / "checkpoints.unreadable").iterdir()] == ["40"]
    assert_same_params(final_params(workdir), final_params(cli_reference))


def test_only_unreadable_checkpoints_are_moved_and_never_all_of_them(tmp_path):
    """Checkpointer alone, small arrays: a truncated newest step falls back to the previous
    one; a target no checkpoint fits (not a disk problem) is an error that moves nothing."""
    import jax
    import jax.numpy as jnp

    from jaxtrain.run.checkpoint import Checkpointer
    from jaxtrain.run.workdir import Layout
    from jaxtrain.config.schema import CheckpointConfig
    from jaxtrain.config.errors import UserError

    cfg = CheckpointConfig(every_steps=1, keep=5, async_save=False)
    ckpt = Checkpointer(tmp_path / "checkpoints", cfg)
    saved = {step: jax.random.normal(jax.random.PRNGKey(step), (256, 256)) for step in (1, 2)}  # incompressible
    for step, w in saved.items():
        ckpt.save(step, {"w": w}, {"next_index": step}, {"tokens": step})
    ckpt.close()
    biggest = max(files_of(tmp_path / "checkpoints" / "2"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    wrong = {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}
    ckpt = Checkpointer(tmp_path / "checkpoints", cfg)
    with pytest.raises(UserError, match="no checkpoint reads back into this run's state"):
        ckpt.restore_newest(wrong, warn=pytest.fail)
    assert complete_checkpoints(tmp_path) == [1, 2] and not Layout(tmp_path).unreadable.exists()
    warnings = []
    right = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
    step, state, data, meta = ckpt.restore_newest(right, warn=warnings.append)
    ckpt.close()
    assert (step, data, meta) == (1, {"next_index": 1}, {"tokens": 1})
    np.testing.assert_array_equal(state["w"], saved[1])
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint at step 2 is unreadable")
    assert complete_checkpoints(tmp_path) == [1]


def test_a_checkpoint_of_8_devices_continues_on_4_with_other_mesh_axes(cli_reference, tmp_path):
    workdir = copy_run(cli_reference, tmp_path / "run", keep_steps=(20,))
    rerun = run_cli(*train_args(workdir, "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"), env=cli_env(4))
    assert rerun.returncode == 0, rerun.stderr
    assert resumed_step(rerun.stdout + rerun.stderr) == 20
    # the loss goes on from the boundary as on 8 devices (other partitioning: other sum order)
    assert_same_losses(workdir, cli_reference, rtol=1e-4)


def test_a_failed_save_is_reported_and_earlier_checkpoints_stay_intact(cli_reference, tmp_path):
    workdir = copy_run(cli_reference, tmp_path / "run", keep_steps=(20,))
    # "disk full" from step 20 on: no file may grow past 50 kB (a checkpoint's array metadata
    # alone is ~100 kB, logs stay far below); with SIGXFSZ ignored such a write fails with
    # EFBIG instead of killing the process
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 50; exec "$@"', "bash", sys.executable, "-m", "jaxtrain"]
    rerun = subprocess.run([*limited, *train_args(workdir)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert rerun.returncode == 2, rerun.stderr
    last = rerun.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxtrain: error: checkpoint save at step 30") and "intact checkpoints: steps [20]" in last
    assert complete_checkpoints(workdir) == [20]
    assert_same_params(final_params(workdir, 20), final_params(cli_reference, 20))
