"""The accelerators jaxtrain knows: one table of peak FLOP/s and interconnect bandwidth,
read by model-FLOPs utilisation (`jaxtrain bench`) and by the roofline (`jaxtrain dry-run
--target`, `communication.roofline`).

Peaks are the vendors' dense (no sparsity) figures per device. A device is found in the
table by its `device_kind` (`table_entry`: whole words, the most specific key wins); on
CPU, or a kind the table does not know, the peak is measured instead: the best of a few
timed 2048^3 matmuls in the compute dtype on this machine.

Interconnect figures are what one ring collective gets per device and direction, within a
node (or slice) and between nodes, and HBM what one program may use of a device; only the
rows that `tools/targets.py` names as compile targets carry them.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp



@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device of a cluster. Where a mesh spans nodes the roofline charges every
    collective the slower inter-node figure (a conservative bound)."""

    name: str
    bf16_flops: float  # dense peak FLOP/s per device
    f32_flops: float  # on NVIDIA the TF32 tensor-core rate, which XLA uses for f32 matmuls by default
    link_bytes_per_s: float | None = None  # within a node / slice
    devices_per_node: int | None = None
    internode_bytes_per_s: float | None = None
    note: str = ""  # where the interconnect figures come from
    hbm_bytes: float | None = None  # what one program may use of a device's memory (`usable`)
    hbm_note: str = ""


# By device kind (matched by `table_entry`).
ACCELERATORS = {
    "H200": Accelerator("H200", 989e12, 495e12),  # same tensor cores as H100 SXM
    "H100": Accelerator("H100 SXM", 989e12, 495e12, 450e9, 8, 50e9,
                        "NVLink 4: 18 links x 25 GB/s per direction within a node of 8; between "
                        "nodes one 400 Gb/s InfiniBand NDR port per GPU",
                        0.75 * 84942979072, "75% of the 79.1 GiB a CUDA H100 80GB reports: what JAX preallocates "
                                            "by default (XLA_PYTHON_CLIENT_MEM_FRACTION)"),
    "H100 PCIe": Accelerator("H100 PCIe", 756e12, 378e12),
    "A100": Accelerator("A100", 312e12, 156e12),
    "L4": Accelerator("L4", 121e12, 60e12),
    # TPU matmuls run f32 as bf16 passes by default
    "TPU v6 lite": Accelerator("TPU v6e chip", 918e12, 918e12, 224e9, 256, 224e9,
                               "ICI 3,584 Gb/s per chip over 4 torus links (112 GB/s each); a ring "
                               "along one torus axis uses 2 of them",
                               31.25 * 2**30, "the HBM libtpu reports available to a program"),
    "TPU v5": Accelerator("TPU v5p chip", 459e12, 459e12, 200e9, 8960, 200e9,
                          "ICI 4,800 Gb/s per chip over 6 torus links (100 GB/s each); a ring "
                          "along one torus axis uses 2 of them. A v5p-64 slice is 32 chips",
                          95.74 * 2**30, "the HBM libtpu reports available to a program"),
    "TPU v5 lite": Accelerator("TPU v5e chip", 197e12, 197e12),
    "TPU v4": Accelerator("TPU v4 chip", 275e12, 275e12),
}

def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def table_entry(device_kind: str) -> str | None:
    """The ACCELERATORS key of `device_kind`, matched by whole words, never substrings.

    A TPU kind names the chip exactly ('TPU v5' is v5p, 'TPU v5 lite' v5e, 'TPU v4 lite'
    v4i, which is not a v4), so it must equal a key. An NVIDIA kind is the model followed by
    variant words ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB'), so the key must be one
    of its words: 'L4' is not a word of 'NVIDIA L40S', nor 'H200' of 'NVIDIA GH200 480GB'.
    Where several keys' words all occur ('H100' and 'H100 PCIe' in 'NVIDIA H100 PCIe'),
    the one with the most words is the card's.
    """
    words = _words(device_kind)
    matches = []
    for key in ACCELERATORS:
        key_words = _words(key)
        if key_words[0] == "tpu":
            if words == key_words:
                return key
        elif set(key_words) <= set(words):
            matches.append(key)
    return max(matches, key=lambda key: len(_words(key)), default=None)


def _measured_matmul_peak(dtype: jnp.dtype, size: int = 2048, repeats: int = 5, trials: int = 3) -> float:
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            matmul(a, a).block_until_ready()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device in `dtype`, where the number comes from)."""
    key = table_entry(device.device_kind)
    if key is not None:
        row = ACCELERATORS[key]
        return (row.bf16_flops if dtype == "bfloat16" else row.f32_flops), f"table: {key} {dtype}"
    peak = _measured_matmul_peak(jnp.dtype(dtype))
    return peak, f"measured: 2048^3 {dtype} matmul on {device.device_kind}"
