"""Several real processes on 127.0.0.1 joined by jax.distributed (gloo collectives on
CPU), launched the way users launch them: `launch/multiprocess.sh` and the CLI flags."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (REFERENCE_SETTINGS, REPO, TINY, assert_same_params, cli_env, final_params, free_port,
                      logged_rows, wait_for_step)
from jaxtrain.config.files import load_config
from jaxtrain.run.loop import run

pytestmark = pytest.mark.slow

PEER_TIMEOUT = 5  # --peer-timeout of the dead-peer test, seconds
EXIT_BOUND = PEER_TIMEOUT + 20  # the survivor must be gone within this many seconds


def launch_two(workdir: Path, port: int, settings: tuple[str, ...] = REFERENCE_SETTINGS) -> subprocess.Popen:
    env = {**os.environ, "JAXTRAIN_PORT": str(port), "JAXTRAIN_CPU_DEVICES": "4", "PYTHONUNBUFFERED": "1",
           "JAXTRAIN_BIN": str(Path(sys.executable).parent / "jaxtrain")}
    return subprocess.Popen(["bash", str(REPO / "launch" / "multiprocess.sh"), "2", str(TINY), str(workdir),
                             *settings], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def process_with_id(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of the launcher's child started with `--process-id process_id`."""
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--process-id" in args and args[args.index(b"--process-id") + 1] == str(process_id).encode():
            return int(pid)
    raise AssertionError(f"no child with --process-id {process_id} among {children}")


def test_two_processes_of_four_devices_match_one_process_of_eight_and_stop_together(cli_reference, tmp_path):
    launcher = launch_two(tmp_path, free_port())
    wait_for_step(launcher, tmp_path, 10)
    owner = json.loads((tmp_path / ".owner").read_text())  # process 0 owns the workdir for the group
    assert owner["pid"] == process_with_id(launcher, 0) and owner["command"] == "train"
    os.kill(process_with_id(launcher, 1), signal.SIGTERM)  # only one process is preempted
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, err
    stops = re.findall(r"stopped by signal 15 after step (\d+)", err)
    assert len(stops) == 2 and stops[0] == stops[1], err  # both processes saved the same step
    rerun = launch_two(tmp_path, free_port())
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resumed from checkpoint at step {stops[0]}" in out
    assert out.count("final val_loss") == 1  # only process 0 speaks for the run
    got, want = logged_rows(tmp_path), logged_rows(cli_reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 41))
    for a, b in zip(got, want, strict=True):  # the same global batches; gloo sums in another order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert_same_params(final_params(tmp_path), final_params(cli_reference), rtol=1e-4)


@pytest.mark.parametrize("mesh", [("mesh.fsdp=1", "mesh.tensor=8"), ("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4")])
def test_each_process_feeds_the_rows_its_devices_hold(mesh, tmp_path):
    """tensor=8 over 2 x 4 devices: the batch is replicated across the processes, so each
    feeds all of it; data=2 x tensor=4: each feeds its half. Either way the global batch,
    and so every loss, is the single-process 8-device run's."""
    settings = (*REFERENCE_SETTINGS, "--set", "train.steps=8", "--set", "schedule.warmup_steps=2",
                "--set", "checkpoint.every_steps=8", *(s for m in mesh for s in ("--set", m)))
    launcher = launch_two(tmp_path / "two", free_port(), settings)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    overrides = [s for s in settings if s != "--set"]  # the reference: this process's 8 devices
    run(load_config(TINY, overrides), tmp_path / "one", console=False)
    got, want = logged_rows(tmp_path / "two"), logged_rows(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


def test_a_dead_peer_makes_the_survivor_exit_with_an_error_in_bounded_time(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxtrain", "train", str(TINY), "--workdir", str(tmp_path),
                               "--set", "train.steps=5000", "--set", "train.log_every=1",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--peer-timeout", str(PEER_TIMEOUT)],
                              cwd=REPO, env=cli_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    wait_for_step(procs[0], tmp_path, 3)
    procs[1].kill()
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=EXIT_BOUND + 60)
    elapsed = time.monotonic() - killed
    assert procs[0].returncode != 0
    assert elapsed < EXIT_BOUND, f"survivor took {elapsed:.0f} s"
    assert "another task died" in err or "unhealthy" in err, err[-2000:]
