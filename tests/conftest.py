"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere, CPU code
generation without LLVM's expensive passes, and one compilation cache for the session.

The suite's programs are tiny, so compiling them costs far more than running them: LLVM
optimization level 0 compiles the suite's steps about a third faster. It changes only the
machine code of each fused kernel, not the HLO (whose collectives and memory the tests
read) nor what it computes; benchmarks (`jaxtrain bench`) run with XLA's defaults.

The suite compiles the same tiny train step in many tests and in every `jaxtrain`
subprocess it starts; JAX's persistent compilation cache (keyed by the HLO, the compile
options and the jax/XLA version, so a changed computation never hits) lets each distinct
program compile once per session. It lives in a fresh directory removed at exit, so no
session reuses another's executables. The variables reach subprocesses through the
environment.
"""

import atexit
import os
import shutil
import tempfile

FAST_CPU_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_CPU_CODEGEN,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxtrain.run import xla_flags  # noqa: E402 - imports no jax

xla_flags.tune_cpu_xla()  # as the CLI does: in-process runs compile what `jaxtrain` subprocesses compile
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxtrain-test-compile-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# The files that take longest (processes, a SLURM job, many runs) are collected first, so
# that under `make test` (one file per worker) they start at once and the short files fill
# in around them instead of one long file finishing alone at the end.
LONGEST_FIRST = ("test_target_plans.py", "test_multihost.py", "test_slurm.py", "test_targets.py", "test_recovery.py",
                 "test_muon.py", "test_huggingface.py", "test_cooldown.py", "test_coord_check.py", "test_inspect.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def tiny_cfg():
    from jaxtrain.config.files import load_config

    return load_config(TINY)


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m jaxtrain ARGS` the way a user would; the env carries the 8 devices."""
    return subprocess.run([sys.executable, "-m", "jaxtrain", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`jaxtrain ARGS` in this process (no interpreter start-up): (status, stdout, stderr)."""
    from jaxtrain import cli

    capsys.readouterr()
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`cli_in_process` with run_cli's result, for tests where a subprocess proves nothing
    more (the one-line errors, exit statuses and outputs all come from `cli.main`)."""
    status, out, err = cli_in_process(capsys, *args)
    return subprocess.CompletedProcess(["jaxtrain", *args], status, out, err)


def cli_env(devices: int) -> dict[str, str]:
    """This environment with `devices` simulated CPU devices instead of 8."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start `python -m jaxtrain ARGS` unbuffered (a killed process still shows its output)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxtrain", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def logged_rows(workdir: Path) -> list[dict]:
    """The rows of a workdir's metrics.jsonl as the library reads them ([] before the file
    exists). A run may be writing it: a last line cut short is not returned yet, silently."""
    from jaxtrain.run.metrics import read_metrics
    from jaxtrain.run.workdir import Layout

    return read_metrics(Layout(workdir).metrics, warn=lambda _: None)


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 240) -> int:
    """Block until the run in `workdir` has logged `step` (or later); returns the newest step."""
    deadline = time.time() + timeout
    while True:
        rows = logged_rows(workdir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()}"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def final_params(workdir: Path, step: int | None = None):
    """The params of a run's checkpoint as host numpy arrays (for exact comparisons)."""
    import jax

    from jaxtrain.tools.saved_run import load_run

    return jax.device_get(load_run(workdir, step).params)


# The tiny config as the CLI runs it, one row per step: the reference the recovery and
# multi-process tests compare against (checkpoints at steps 20, 30, 40).
REFERENCE_SETTINGS = ("--set", "train.log_every=1")


@pytest.fixture(scope="session")
def cli_reference(tmp_path_factory) -> Path:
    """The single-process 8-device run the multi-process and recovery tests must reproduce
    (trained in this process: the reference needs no process of its own)."""
    from jaxtrain.config.files import load_config
    from jaxtrain.run.loop import run

    workdir = tmp_path_factory.mktemp("cli_reference")
    run(load_config(TINY, [s for s in REFERENCE_SETTINGS if s != "--set"]), workdir, console=False)
    return workdir


def assert_same_params(got, want, rtol: float = 0.0) -> None:
    import jax
    import numpy as np

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        if rtol:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def figure_panels(path: Path) -> list[dict]:
    """What a jaxtrain PNG draws, from its Description text (tools/plotting.py `_save`):
    per panel its title, axis labels and {curve label: point count}."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        return json.loads(image.text["Description"])["panels"]


@pytest.fixture
def workdir_holder(tmp_path):
    """Start a process that owns a workdir (`workdir.owned`) and does nothing else:
    `workdir_holder(copy_of=RUN)` -> (workdir, the holder's pid); the workdir holds a copy
    of RUN's files, or nothing but the lock file."""
    started = []

    def hold(copy_of: Path | None = None, command: str = "train") -> tuple[Path, int]:
        workdir = tmp_path / f"held{len(started)}"
        if copy_of is not None:
            shutil.copytree(copy_of, workdir)
        code = ("import sys, time; from jaxtrain.run.workdir import owned\n"
                "with owned(sys.argv[1], sys.argv[2]):\n    print('owned', flush=True); time.sleep(600)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(workdir), command], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "owned"
        return workdir, proc.pid

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()
