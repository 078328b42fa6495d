"""The train step compiled for a named target (`targets.py`) on this machine, and what that
compiled program says: `jaxtrain dry-run CONFIG --compile --target NAME`.

The program is the one `jaxtrain train` would run there: the real train step, lowered with
abstract arguments (parameters, optimizer state and the batch, packed or not, with their
shardings) for a mesh of the target's devices, and compiled by the target's own compiler.
Reported per device:

  memory        the compiler's buffer assignment: arguments + outputs - aliased (the state
                updated in place) + temporaries = total, against the device's usable HBM
                (`accelerators.py`). It fits, or the plan is refused in one line quoting
                both figures (and, where the compiler itself refused, its words).
  collectives   bytes by kind counted from the compiled HLO (`hlo_collectives.py`: loop
                trip counts, asynchronous start/done pairs counted once).
  attention     the kernel the program contains: cuDNN flash attention (`__cudnn$fmha*`
                custom calls), splash attention (Mosaic `tpu_custom_call`s), or XLA's
                quadratic softmax(q k^T) v when neither is there.
  FLOPs         the model formula (`flops.py`, 6N + 12 L H d_head T per token): XLA's cost
                analysis counts a loop body once (TPU) or not at all (GPU, deviceless).
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax

from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.model import sharding
from jaxtrain.tools import communication, hlo_collectives, targets

# The compiler's own words when a program exceeds HBM (libtpu; XLA:GPU compiles and reports sizes instead).
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: (Ran out of memory[^\n]*?)(?:\.\s|\n|$)")
_COMPILER_FIGURES = re.compile(r"\(([\d.]+)([KMGT])\)")


class DoesNotFit(UserError):
    """The step needs more memory per device than the target has."""


def attention_kernel(hlo_text: str) -> dict[str, Any]:
    """Which attention the compiled program runs, and how many of its kernels it calls."""
    cudnn = len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text))
    splash = len(re.findall(r"^\s*(?:ROOT )?%splash_\w*\.?\d* = .* custom-call\(", hlo_text, re.MULTILINE))
    if cudnn:
        return {"kernel": "cudnn", "custom_calls": cudnn}
    if splash:
        return {"kernel": "splash", "custom_calls": splash}
    return {"kernel": "xla", "custom_calls": 0}


def compiled_memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    return {**parts, "total": parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]}


def compile_for(cfg: Config, target: targets.Target) -> dict[str, Any]:
    """The compiled program's report (module docstring); a step the compiler refuses for
    memory is a report with `fits` False and the compiler's words."""
    mesh = sharding.make_mesh(cfg.mesh, targets.compile_only_devices(target))
    sharding.check_batch_splits(cfg, dict(mesh.shape))
    usable = target.hardware.hbm_bytes
    report: dict[str, Any] = {"target": target.name, "devices": target.devices, "platform": target.platform,
                              "device_kind": mesh.devices.flat[0].device_kind, "usable_hbm": usable,
                              "hbm_note": target.hardware.hbm_note}
    started = time.perf_counter()
    try:
        compiled = communication.compiled_step(cfg, mesh)
    except jax.errors.JaxRuntimeError as err:
        refused = _OUT_OF_MEMORY.search(str(err))
        if refused is None:
            raise
        return {**report, "fits": False, "compiler_says": refused.group(1), "compile_s": time.perf_counter() - started,
                "memory": _figures_from(refused.group(1))}
    memory = compiled_memory(compiled)
    text = compiled.as_text()
    return {**report, "fits": memory["total"] <= usable, "compile_s": time.perf_counter() - started,
            "memory": memory, "collectives": hlo_collectives.bytes_by_kind(text),
            "attention": attention_kernel(text)}


def _figures_from(message: str) -> dict[str, float]:
    """libtpu's (needed, available) in bytes, from '... (407.95G) exceeds available HBM (95.74G)'."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    figures = [float(n) * scale[unit] for n, unit in _COMPILER_FIGURES.findall(message)]
    return {"temporaries": figures[0], "total": figures[0]} if figures else {}


def refusal(report: dict[str, Any]) -> str:
    """The one line for a step that does not fit its target."""
    need = report["memory"].get("total")
    needs = f"needs {_gib(need)} per device" if need else "does not fit"
    words = f" (the compiler: {report['compiler_says']})" if "compiler_says" in report else ""
    return (f"--target {report['target']}: the train step {needs} but a {report['device_kind']} has "
            f"{_gib(report['usable_hbm'])} usable{words}; `--fit` finds a remat / microbatch plan that fits")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
