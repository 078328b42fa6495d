"""The execution options a step is compiled with, resolved for the devices it runs on.

`model.dtype` and `model.attention` may say `auto`; what they mean depends on the platform
of the devices the step is compiled FOR, which is not always this process's backend: a
deviceless compile for an H100 or TPU target runs with JAX_PLATFORMS=cpu, so
jax.default_backend() is "cpu" while the mesh's devices say "gpu" / "tpu". Every caller
names the platform (None: this process's backend), and this module alone turns the config
into concrete options:

    dtype      auto -> bfloat16 on accelerators (gpu, tpu), float32 on cpu
    attention  auto -> attention.kernel_for: cudnn (gpu, half precision, shapes allowing),
               splash (tpu, tiles dividing the sequence), xla otherwise

`resolve(cfg, platform)` returns the config with both concrete; step.model_spec builds the
model from it, so the compiled step, the memory estimate (run/memory.py), dry-run, bench and
telemetry all read the same answer off `cfg.model` (`kernel` and `compute_dtype_name` are
identities on a resolved config). An explicit option the target cannot run is a one-line
ConfigError naming the key (`check`, run by preflight before anything compiles).
"""

from __future__ import annotations

import jax

from jaxtrain.config.schema import Config, ModelConfig
from jaxtrain.model.attention import kernel_for


def platform_of(platform: str | None) -> str:
    """`platform`, or this process's backend ("cpu", "gpu", "tpu") where None."""
    return jax.default_backend() if platform is None else platform


def compute_dtype_name(cfg: ModelConfig, platform: str | None = None) -> str:
    """The matmul/attention dtype on devices of `platform`: `auto` is bfloat16 on
    accelerators, float32 on CPU."""
    if cfg.dtype == "auto":
        return "float32" if platform_of(platform) == "cpu" else "bfloat16"
    return cfg.dtype


def kernel(cfg: Config, platform: str | None = None) -> str:
    """The attention kernel the step runs on devices of `platform` (xla, cudnn or splash)."""
    return kernel_for(cfg.model.attention, platform_of(platform), compute_dtype_name(cfg.model, platform),
                      cfg.model.head_dim, cfg.data.seq_len)


def resolve(cfg: Config, platform: str | None = None) -> Config:
    """cfg with `model.dtype` and `model.attention` concrete for devices of `platform`."""
    model = cfg.model.model_copy(update={"dtype": compute_dtype_name(cfg.model, platform),
                                         "attention": kernel(cfg, platform)})
    return cfg.model_copy(update={"model": model})


def check(cfg: Config, platform: str | None = None) -> None:
    """Execution options devices of `platform` cannot run, as a one-line ConfigError."""
    kernel(cfg, platform)
