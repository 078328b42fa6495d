"""The shipped accelerator configs compiled for their real targets, deviceless, by the TPU and
GPU compilers of `.venv-compile` (`make compile-venv`, which `make test` runs): they fit,
they run the fused attention kernel, and the compiler's memory agrees with the dry-run's
estimate (collectives and refusals: `tests/test_target_plans.py`).

Each compile runs `jaxtrain dry-run --compile --target NAME --json` in the compile venv, as a
user would: this test process's own jax knows only the CPU.
"""

import json
import os
import subprocess

import pytest

from conftest import REPO

COMPILE_VENV = REPO / ".venv-compile"
GPT350M, LLAMA1B = REPO / "configs" / "gpt350m.yaml", REPO / "configs" / "llama1b.yaml"
KERNEL = {"tpu": "splash", "gpu": "cudnn"}
ESTIMATE_WITHIN = 1.3  # compiled memory / estimate, either way

pytestmark = pytest.mark.slow


def target_dry_run(config, target: str, *options: str) -> subprocess.CompletedProcess:
    jaxtrain = COMPILE_VENV / "bin" / "jaxtrain"
    assert jaxtrain.exists(), f"{jaxtrain} missing: `make compile-venv` installs the accelerator compilers"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices there
    return subprocess.run([str(jaxtrain), "dry-run", str(config), "--target", target, *options],
                          capture_output=True, text=True, env=env, timeout=600)


def compiled(config, target: str, *sets: str) -> dict:
    done = target_dry_run(config, target, "--compile", "--json", *[f"--set={s}" for s in sets])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("config,target", [(GPT350M, "tpu-v5p-8"), (GPT350M, "h100x8"), (GPT350M, "h100"),
                                           (LLAMA1B, "tpu-v5p-32"), (LLAMA1B, "h100x8")],
                         ids=lambda v: getattr(v, "stem", v))
def test_a_shipped_config_fits_its_target_with_the_fused_attention_kernel(config, target):
    plan = compiled(config, target)
    report = plan["compiled"]
    assert report["fits"] and report["memory"]["total"] <= report["usable_hbm"]
    assert report["attention"]["kernel"] == KERNEL[report["platform"]] and report["attention"]["custom_calls"] > 0
    ratio = report["memory"]["total"] / plan["memory_per_device"]["total"]
    assert 1 / ESTIMATE_WITHIN <= ratio <= ESTIMATE_WITHIN, (report["memory"], plan["memory_per_device"])
