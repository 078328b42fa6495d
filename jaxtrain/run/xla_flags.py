"""XLA flags this process sets before JAX starts a backend (the CLI calls these first).

Both leave flags the user set alone, and take effect only if no backend has started yet.
"""

from __future__ import annotations

import os

# XLA:CPU flag measured to speed up the train step (docs/performance.md): YNNPACK fusions
# off, so matmuls go to XLA's own dot emitter (+19% tokens/s on the CPU benchmark model).
# Only for the jaxlib minor version it was measured on: an unknown XLA flag aborts.
_CPU_XLA_FLAGS = {"0.10.": "--xla_cpu_experimental_ynn_fusion_type="}


def tune_cpu_xla() -> None:
    """Add the measured XLA:CPU flag before jax starts, unless the user set XLA flags of
    that name or JAXTRAIN_DEFAULT_XLA=1 asks for XLA's own defaults."""
    from jaxlib.version import __version__ as jaxlib_version  # does not start a backend

    flags = os.environ.get("XLA_FLAGS", "")
    for version, flag in _CPU_XLA_FLAGS.items():
        name = flag.split("=")[0]
        if jaxlib_version.startswith(version) and name not in flags and not os.environ.get("JAXTRAIN_DEFAULT_XLA"):
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def simulate_cpu_devices(count: int | None) -> None:
    """Ask XLA:CPU for `count` devices, unless XLA_FLAGS already fixes the number (takes
    effect only if no jax backend has started in this process yet)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def compile_for_targets() -> None:
    """This process compiles for accelerators it does not have (`tools/targets.py`); call it
    before jax starts. The CPU is its only backend (a compiler plugin found installed is not
    started as a backend), libtpu neither asks a cloud metadata server for its topology nor
    warns that it could not (the target names it), and several such processes may load
    libtpu at once (it otherwise takes a machine-wide lock file)."""
    for key, value in {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                       "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}.items():
        os.environ.setdefault(key, value)
