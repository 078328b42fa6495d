"""Model FLOPs per token, and the peak FLOP/s that model-FLOPs utilisation divides by.

Model FLOPs (Chowdhery et al. 2022, "PaLM", App. B) count the matmuls of one training
step, forward and backward, per token, whatever the implementation actually executes
(rematerialisation does not raise them):

    F = 6 N + 12 L H d_head T

    N   parameters in matmuls: per layer q, k, v, o and the three SwiGLU matrices, plus the
        untied LM head (the embedding is a gather, not a matmul, so it is not counted);
    6   2 FLOPs per multiply-add, times 3 for the forward and the two backward matmuls;
    12 L H d_head T   attention scores Q K^T and the weighted sum A V over all T keys
        (2 matmuls x 2 FLOPs x 3 passes), counted for the full T x T square as PaLM does,
        although causal masking makes half of it redundant.

MFU = F * tokens/s / peak FLOP/s. Accelerator peaks are the vendors' dense (no sparsity)
figures in `PEAK_FLOPS`; on CPU, where no such table makes sense, the peak is measured:
the best of a few timed 2048^3 matmuls in the compute dtype on this machine.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

from jaxtrain.config import ModelConfig

# Dense peak FLOP/s per device by device kind (matched by `table_entry`): (bfloat16, float32).
# float32 on NVIDIA is the TF32 tensor-core rate, which XLA uses for f32 matmuls by default.
PEAK_FLOPS = {
    "H200": (989e12, 495e12),  # same tensor cores as H100 SXM
    "H100": (989e12, 495e12),  # SXM5
    "H100 PCIe": (756e12, 378e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v6 lite": (918e12, 918e12),  # v6e; TPU matmuls run f32 as bf16 passes by default
    "TPU v5": (459e12, 459e12),  # v5p
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v4": (275e12, 275e12),
}


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def table_entry(device_kind: str) -> str | None:
    """The PEAK_FLOPS key of `device_kind`, matched by whole words, never substrings.

    A TPU kind names the chip exactly ('TPU v5' is v5p, 'TPU v5 lite' v5e, 'TPU v4 lite'
    v4i, which is not a v4), so it must equal a key. An NVIDIA kind is the model followed by
    variant words ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB'), so the key must be one
    of its words: 'L4' is not a word of 'NVIDIA L40S', nor 'H200' of 'NVIDIA GH200 480GB'.
    Where several keys' words all occur ('H100' and 'H100 PCIe' in 'NVIDIA H100 PCIe'),
    the one with the most words is the card's.
    """
    words = _words(device_kind)
    matches = []
    for key in PEAK_FLOPS:
        key_words = _words(key)
        if key_words[0] == "tpu":
            if words == key_words:
                return key
        elif set(key_words) <= set(words):
            matches.append(key)
    return max(matches, key=lambda key: len(_words(key)), default=None)


def matmul_params(cfg: ModelConfig) -> int:
    """N: parameters that take part in a matmul (all but the embedding and norm gains)."""
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2  # q, o and k, v
    mlp = 3 * d * cfg.ff_dim
    return cfg.n_layers * (attention + mlp) + d * cfg.vocab_size


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """F = 6 N + 12 L H d_head T (see the module docstring)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)


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
    kind = table_entry(device.device_kind)
    if kind is not None:
        bf16, f32 = PEAK_FLOPS[kind]
        return (bf16 if dtype == "bfloat16" else f32), f"table: {kind} {dtype}"
    peak = _measured_matmul_peak(jnp.dtype(dtype))
    return peak, f"measured: 2048^3 {dtype} matmul on {device.device_kind}"
