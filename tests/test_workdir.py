"""One workdir, one owner: a second writer (train, cooldown, import) is refused in one line
naming the holder and changes nothing; the holder's run ends as an unshared run would; a
SIGKILLed holder's rerun starts at once; read-only commands work while a run trains; a full
disk is one line and the run resumes once space is freed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REFERENCE_SETTINGS, REPO, TINY, assert_same_params, cli_in_process, final_params, logged_rows,
                      run_cli, start_cli, wait_for_step)

pytestmark = pytest.mark.slow


def train_args(workdir, *extra):
    return ("train", str(TINY), "--workdir", str(workdir), *REFERENCE_SETTINGS, *extra)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxtrain: error: "), err
    return lines[0]


def test_a_train_on_an_owned_workdir_is_one_line_naming_the_holder_and_changes_nothing(
        workdir_holder, cli_reference, capsys):
    workdir, pid = workdir_holder(copy_of=cli_reference)
    before = snapshot(workdir)
    status, _, err = cli_in_process(capsys, *train_args(workdir))
    line = one_error_line(err)
    assert status == 2 and f"pid {pid}," in line and "`jaxtrain train`" in line, line
    assert snapshot(workdir) == before


def test_a_second_train_is_refused_while_the_first_ends_as_an_unshared_run(cli_reference, tmp_path, capsys):
    workdir = tmp_path / "run"
    first = start_cli(*train_args(workdir))
    wait_for_step(first, workdir, 20)  # its checkpoint at step 20 is written or being written
    first.send_signal(signal.SIGSTOP)  # the holder pauses mid-run: what follows happens while it owns the workdir
    try:
        before = snapshot(workdir)
        status, _, err = cli_in_process(capsys, *train_args(workdir))
        assert status == 2 and f"pid {first.pid}," in one_error_line(err)
        assert snapshot(workdir) == before
        while not (workdir / "checkpoints" / "20").is_dir():  # orbax renames a save into place when complete
            first.send_signal(signal.SIGCONT)
            time.sleep(0.05)
            first.send_signal(signal.SIGSTOP)
        for read_only in (("eval", str(workdir), "--step", "20"), ("plot", str(workdir), "--out", str(tmp_path / "p.png"))):
            status, _, err = cli_in_process(capsys, *read_only)
            assert status == 0, (read_only, err)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    got, want = logged_rows(workdir), logged_rows(cli_reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30", "40"]
    assert_same_params(final_params(workdir), final_params(cli_reference))


def test_a_sigkilled_owner_does_not_block_its_rerun(tmp_path, capsys):
    workdir = tmp_path / "run"
    first = start_cli(*train_args(workdir, "--set", "train.steps=12"))
    wait_for_step(first, workdir, 2)
    first.kill()
    first.wait()
    status, out, err = cli_in_process(capsys, *train_args(workdir, "--set", "train.steps=12"))
    assert status == 0 and "final val_loss" in out, err


def test_init_from_a_workdir_that_does_not_exist_is_refused_before_anything_is_created(tmp_path, capsys):
    workdir = tmp_path / "new"
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                    "--set", f"train.init_from={{workdir: {tmp_path / 'nowhere'}}}")
    assert status == 2 and "train.init_from.workdir" in one_error_line(err)
    assert not workdir.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only): room for the tiny run's logs and two checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(small_disk, cli_reference, capsys):
    """As a user sees it (a process of its own: after a failed write it exits at once,
    abandoning orbax's writer threads)."""
    workdir = small_disk / "run"
    failed = run_cli(*train_args(workdir))
    line = one_error_line(failed.stderr)
    assert failed.returncode == 2 and "no space left on device" in line and str(workdir) in line, line  # whichever file hit it first
    intact = json.loads(re.search(r"intact checkpoints: steps (\[[\d, ]*\])", line).group(1))
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved == intact and saved, line  # only complete checkpoints are left, no temporary ones
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    status, out, err = cli_in_process(capsys, *train_args(workdir))
    assert status == 0 and f"resumed from checkpoint at step {saved[-1]}" in out, err
    assert [r["loss"] for r in logged_rows(workdir)] == [r["loss"] for r in logged_rows(cli_reference)]


def test_a_checkpoints_directory_made_read_only_mid_run_is_one_line_and_a_prompt_exit(tmp_path):
    """As a user without root's override of file permissions (setpriv drops it from root):
    the failed save is one line, and the process exits at once instead of waiting on
    orbax's writer threads (they had kept it alive until killed)."""
    workdir = tmp_path / "run"
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*as_user, sys.executable, "-m", "jaxtrain", *train_args(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, workdir, 5)
    (workdir / "checkpoints").chmod(0o555)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        (workdir / "checkpoints").chmod(0o755)
    line = one_error_line(err)
    assert proc.returncode == 2 and "permission denied" in line and "intact checkpoints: steps" in line, line


@pytest.mark.parametrize("damage, named", [
    ("metrics.jsonl is a directory", "metrics.jsonl: is a directory"),
    ("tb is a file", "tb: not a directory"),
    ("tb is read-only", "permission denied"),
])
def test_a_run_file_that_cannot_be_written_is_one_line_naming_it(damage, named, cli_reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(cli_reference, workdir)
    if damage == "metrics.jsonl is a directory":
        (workdir / "metrics.jsonl").unlink()
        (workdir / "metrics.jsonl").mkdir()
    elif damage == "tb is a file":
        shutil.rmtree(workdir / "tb")
        (workdir / "tb").write_text("")
    else:
        (workdir / "tb").chmod(0o555)
    checkpoints = snapshot(workdir / "checkpoints")
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    done = subprocess.run([*as_user, sys.executable, "-m", "jaxtrain", *train_args(workdir, "--set", "train.steps=41")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if (workdir / "tb").is_dir():
        (workdir / "tb").chmod(0o755)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and named in line and str(workdir) in line, line
    assert snapshot(workdir / "checkpoints") == checkpoints
