"""The SLURM path for real: a one-node cluster (slurmctld, slurmd, munged on 127.0.0.1,
`launch/slurm_local_cluster.sh`) runs `sbatch launch/slurm.sbatch` as a 2-task job step of
4 CPU devices each. The processes join `jax.distributed` from SLURM's environment alone and
log the single-process run's losses; `scancel --signal=TERM` makes both checkpoint the same
step and the job exit 143, and the requeued job (`scontrol requeue`) resumes at that step
and finishes with the reference's losses and parameters."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST_CPU_CODEGEN, REFERENCE_SETTINGS, REPO, TINY, assert_same_params, final_params, logged_rows

pytestmark = pytest.mark.slow

CLUSTER = REPO / "launch" / "slurm_local_cluster.sh"


@pytest.fixture(scope="module")
def slurm():
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if started.returncode in (2, 3):  # not root / no package source: nothing here can run a scheduler
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stderr
    yield
    subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=60)


def job_state(job: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=True).stdout.strip()


def slurmd_runs_a_step_of(job: str) -> bool:
    """slurmd's own state: `scontrol listpids` asks every step daemon on this node, and
    fails once none of the job's steps (batch, extern, the srun step) is left."""
    return subprocess.run(["scontrol", "listpids", job], capture_output=True).returncode == 0


def after_revocation() -> None:
    """Wait into the next whole second. Tearing a job down revokes its credential at a time
    in whole seconds, and slurmd refuses a launch whose credential was made at or before
    that second: a requeue in the same second as the revocation would be refused."""
    time.sleep(1.05 - time.time() % 1)


def wait_for(condition, what: str, timeout: float = 120, details=lambda: "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"waited {timeout} s for {what}\n{details()}"
        time.sleep(0.5)


def wait_until_done(job: str, log: Path, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while job_state(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
        assert time.time() < deadline, story(job, log)
        time.sleep(1)
    return job_state(job)


def story(job: str, log: Path) -> str:
    """What a failure message needs: the job's state, the end of its output and what the
    controller logged about it (one line each, so nothing is folded away)."""
    controller = Path("/var/log/slurm/slurmctld.log")
    said = [line for line in controller.read_text().splitlines() if f"JobId={job} " in f"{line} "] \
        if controller.exists() else []
    output = [line for line in (log.read_text().splitlines() if log.exists() else [])
              if not line.startswith("[Gloo]")]
    state = job_state(job)
    summary = " ".join(f"{key}={state.get(key)}" for key in ("JobState", "Reason", "ExitCode", "Restarts"))
    return "\n".join([f"job {job}: {summary}", "-- the job's output, last 30 lines:", *output[-30:],
                      "-- slurmctld on the job:", *said[-20:]])


def test_a_slurm_job_joins_from_its_environment_stops_on_term_and_resumes_when_requeued(
        slurm, cli_reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "job.out"
    env = {**os.environ, "XLA_FLAGS": f"{FAST_CPU_CODEGEN} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-task=0", f"--output={log}",
                          "launch/slurm.sbatch", str(TINY), str(workdir), *REFERENCE_SETTINGS,
                          "--set", "train.grace_period_sec=30"],
                         capture_output=True, text=True, cwd=REPO, env=env, check=True).stdout.strip()
    deadline = time.time() + 300
    while len(logged_rows(workdir)) < 10:
        assert time.time() < deadline and job_state(job)["JobState"] in ("PENDING", "RUNNING"), story(job, log)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    stopped = wait_until_done(job, log)
    output = log.read_text()
    steps = set(re.findall(r"stopped by signal 15 after step (\d+)", output))
    assert stopped["ExitCode"] == "143:0" and len(steps) == 1, story(job, log)  # both processes, the same step
    step = int(steps.pop())
    assert output.count(f"stopped by signal 15 after step {step}") == 2, story(job, log)
    # The node shows idle before slurmd has torn down every step of the job; a requeue sent
    # then has its launch refused ("Job N already killed, do not launch batch job") and the
    # job ends FAILED. Wait for slurmd's own word that no step of the job is left.
    wait_for(lambda: node_state() == "idle" and not slurmd_runs_a_step_of(job),
             "slurmd to finish every step of the stopped job", details=lambda: story(job, log))
    after_revocation()
    subprocess.run(["scontrol", "requeue", job], check=True)
    # Slurm holds a requeued batch job for ~2 minutes before it is eligible again (so a
    # failing job does not thrash the cluster); an operator's StartTime=now releases it
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    # the rerun has begun once the job runs again or writes to its output: only then can
    # its end state be told from the stopped run's
    stopped_output = len(output)
    wait_for(lambda: job_state(job)["JobState"] == "RUNNING" or len(log.read_text()) > stopped_output,
             "the requeued job to start again", details=lambda: story(job, log))
    finished = wait_until_done(job, log)
    output = log.read_text()
    assert finished["JobState"] == "COMPLETED" and finished["Restarts"] == "1", story(job, log)
    assert f"resumed from checkpoint at step {step}" in output, story(job, log)
    got, want = logged_rows(workdir), logged_rows(cli_reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 41))
    for a, b in zip(got, want):  # 2 processes x 4 devices vs 1 x 8: gloo sums in another order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    assert_same_params(final_params(workdir), final_params(cli_reference), rtol=1e-4)
