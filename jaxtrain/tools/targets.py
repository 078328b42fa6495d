"""The clusters jaxtrain compiles for without having them: named topologies of TPU chips or
NVIDIA GPUs, and their devices made "compile only" on this machine.

Both XLA compilers run deviceless. `jax.experimental.topologies.get_topology_desc` builds a
topology's devices from libtpu (TPU) or from the CUDA PJRT plugin and an XLA GPU target
description (GPU: `jaxtrain/targets/*.txtpb`, the device properties XLA compiles for); a
program lowered for a mesh of those devices compiles exactly as on the cluster (memory
analysis, collectives, fused kernels) but cannot run. The compilers come from optional
extras installed into their own virtual environment (`make compile-venv`):

    pip install 'jaxtrain[tpu-compile]'    libtpu matching jax (about 0.3 GB)
    pip install 'jaxtrain[gpu-compile]'    the CUDA PJRT plugin and ptxas / libdevice (about 1.2 GB)

Their own venv, because a jax that finds libtpu or the CUDA plugin tries to start those
backends in every program (slow, noisy) where `make train` wants the CPU alone.

A target names its devices: `h100x8x4` is 4 nodes of 8 H100s; `tpu-v5p-8` is Google's
name for 8 TensorCores, i.e. 4 v5p chips (one device each, megacore), `tpu-v6e-8` 8 v6e chips.
Per-device peak FLOP/s, link bandwidths and HBM come from `accelerators.ACCELERATORS`, the
table that MFU and the roofline read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from jaxtrain.config.errors import UserError
from jaxtrain.tools.accelerators import ACCELERATORS, Accelerator

SPECS = Path(__file__).resolve().parent.parent / "targets"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    accelerator: str  # its ACCELERATORS key
    platform: str  # "gpu" or "tpu"
    devices: int
    topology: str  # TPU: libtpu's topology name; GPU: partitions x hosts x GPUs per host
    chips_per_host: tuple[int, int, int] | None = None  # TPU only
    chip_config: str = "default"  # TPU: "megacore" makes a v5p chip's two cores one device
    gpu_spec: str | None = None  # GPU: the target description in SPECS

    @property
    def hardware(self) -> Accelerator:
        return ACCELERATORS[self.accelerator]


def _h100(name: str, hosts: int, per_host: int) -> Target:
    return Target(name, "H100", "gpu", hosts * per_host, f"1x{hosts}x{per_host}", gpu_spec="h100_sxm.txtpb")


def _v5p(cores: int, topology: str) -> Target:
    return Target(f"tpu-v5p-{cores}", "TPU v5", "tpu", cores // 2, f"v5p:{topology}", (2, 2, 1), "megacore")


TARGETS = {t.name: t for t in (
    _h100("h100", 1, 1), _h100("h100x8", 1, 8), _h100("h100x8x4", 4, 8), _h100("h100x8x16", 16, 8),
    _v5p(8, "2x2x1"), _v5p(32, "2x2x4"), _v5p(64, "2x4x4"), _v5p(256, "4x4x8"),
    Target("tpu-v6e-8", "TPU v6 lite", "tpu", 8, "v6e:2x4x1", (2, 4, 1)),
    Target("tpu-v6e-64", "TPU v6 lite", "tpu", 64, "v6e:8x8", (2, 4, 1)),
)}

_EXTRA = {"tpu": "tpu-compile", "gpu": "gpu-compile"}
_COMPILER_MODULES = {"tpu": ("libtpu",), "gpu": ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc")}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"--target {name}: not one of {', '.join(TARGETS)}")
    return TARGETS[name]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_compiler(t: Target) -> None:
    """One line naming the pip command, where this Python lacks the target's compiler."""
    missing = [m for m in _COMPILER_MODULES[t.platform] if not _installed(m)]
    if missing:
        raise UserError(f"--target {t.name} --compile needs the {t.platform.upper()} compiler ({', '.join(missing)} "
                        f"not installed): pip install -e '.[{_EXTRA[t.platform]}]' into a venv of its own "
                        f"(`make compile-venv` makes .venv-compile with both compilers)")


def compile_only_devices(t: Target) -> list:
    """The target's devices, on which programs compile but never run."""
    check_compiler(t)
    from jax.experimental import topologies

    if t.platform == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", t.name.removeprefix("tpu-"))  # read once, when libtpu starts
        found = topologies.get_topology_desc(platform="tpu", topology_name=t.topology, chip_config_name=t.chip_config,
                                             chips_per_host_bounds=t.chips_per_host, num_slices=1).devices
    else:
        spec = (SPECS / t.gpu_spec).read_text()
        found = topologies.get_topology_desc(platform="cuda", target_config=spec, topology=t.topology).devices
    if len(found) != t.devices:
        raise RuntimeError(f"target {t.name}: the compiler made {len(found)} devices, the table says {t.devices}")
    return list(found)
