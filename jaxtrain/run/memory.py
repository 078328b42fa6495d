"""Memory per device of a training step, estimated from shapes alone, and the preflight that
compares it with what this machine's devices have before anything is compiled or written
(`jaxtrain train`; `jaxtrain dry-run` prints the same estimate).

Memory per device (bytes), with P = parameter elements held by one device (the exact
sum over parameters of size / product of the mesh axes sharding it; P_adam and P_muon split
it by the table's update rule: Adam keeps two moments, Muon one momentum):

    params 4P + optimizer state 8P_adam + 4P_muon + gradients 4P       (all float32)
  + saved activations   sum over blocks t * s(remat)          (what the layer scan keeps)
  + the larger of       logits   t * V/tp * 4                  (float32, at the loss; the
                                                               softmax and its gradient fuse
                                                               into that buffer)
                        recompute t * max s(none)              (one block's residuals rebuilt
                                                               in the backward pass, if remat
                                                               is not none)

The logits live before the backward pass reaches the blocks and the recomputed block
after, so the peak holds one or the other, not both. That, and a block's norm and
residual-stream values kept in float32 (the RMSNorm computes in float32) where the
compute dtype is bfloat16, is what the TPU v5p and H100 compilers' buffer assignments of
gpt350m and llama1b show (docs/performance.md "Compiled for real targets": compiled /
estimate 0.9-1.2 over remat x microbatch plans, where 3 logit-sized buffers and a recompute
on top of them had read 0.44-0.68).

t = tokens per device per microbatch = batch * seq_len / (data * fsdp * expert * microbatches),
tp = the tensor axis, b = compute-dtype bytes. s(remat) is the bytes one block saves for
the backward pass per token, read off `jax.ad_checkpoint` residuals of this model (d =
d_model, f = the block's MLP width per token: d_ff, or in a MoE block the widths of the
top_k routed experts and the shared expert; H = heads, T = seq_len):

    none            11 d * 4 + (6 f/tp (+ 4 H T/tp with XLA attention, which keeps the T x T
                    scores and probabilities; cuDNN and splash flash attention keep neither.
                    cuDNN's packed-document bias, (B, 1, T, T), is one array per step, not
                    per layer: +8 MB on gpt350m's compiled H100 step, not counted)) * b
    dots_saveable   (8 d + 2 f/tp) * b
    full             2 d * b

With model.moe, f = (r + n_shared_experts) * expert_d_ff, r = the rows of the routed
experts' matmuls per token: top_k, or under expert parallelism (mesh.expert = X > 1) the
exchange's dropless buffer X min(top_k, E/X) (`expert_rows_per_token`), whose rows (sent and
received, 2 r d) remat none keeps too; under dots_saveable f is the shared expert's width
alone (the routed experts' ragged_dot outputs are not dots the policy saves).

The attention kernel is the one the step compiles (model/execution.py: `auto` is cuDNN on GPU
in bfloat16, splash on TPU, XLA on CPU, where shapes allow). The compute dtype and attention
follow `--backend` (default: this machine's).

It is an estimate: XLA's buffer assignment may fuse away or add temporaries; the test
suite holds it to the compiled step's own memory analysis for small configs.

Available memory: an accelerator's `memory_stats()["bytes_limit"]`; on CPU the host's
available RAM (MemAvailable), shared by its simulated devices. A model whose estimate
exceeds it is refused with both figures (`--skip-memory-check` overrides, for users who know
the estimate is pessimistic for their case).
"""

from __future__ import annotations

import functools
import math
import os

import jax
from jax.sharding import Mesh

from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.model import sharding
from jaxtrain.model import execution
from jaxtrain.model.execution import compute_dtype_name

COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}


def flash_attention(cfg: Config, backend: str) -> bool:
    """Whether the step on `backend` devices runs a flash kernel (cuDNN or splash), which keeps
    no T x T scores: the kernel model/execution.py chooses, the one the step compiles."""
    return execution.kernel(cfg, backend) != "xla"


def expert_rows_per_token(cfg: Config, expert_shards: int) -> int:
    """Rows of the routed experts' matmuls a token occupies on its device: top_k on one
    device; X min(top_k, E / X) along an `expert` axis of X devices, the dropless capacity
    of the exchange (model/moe_dispatch.py: C = N min(k, E/X) rows from each of X sources)."""
    moe = cfg.model.moe
    if expert_shards == 1:
        return moe.top_k
    return expert_shards * min(moe.top_k, moe.n_experts // expert_shards)


def block_bytes_per_token(cfg: Config, remat: str, tensor: int, backend: str, moe_block: bool = False,
                          expert_shards: int = 1) -> float:
    """s(remat): bytes one block keeps for the backward pass, per token. A dense block's MLP
    is model.d_ff wide; a MoE block's (`moe_block`) width is its expert rows'
    (`expert_rows_per_token`) plus the shared expert's, and under expert parallelism remat
    none also keeps the exchanged rows, both ways (2 rows x d); dots_saveable keeps no routed
    expert's output (ragged_dot is not a dot it saves)."""
    d, heads, seq, moe = cfg.model.d_model, cfg.model.n_heads, cfg.data.seq_len, cfg.model.moe
    f = saved_f = cfg.model.ff_dim
    exchanged = 0.0
    if moe_block:
        rows, width = expert_rows_per_token(cfg, expert_shards), moe.expert_width(cfg.model.ff_dim)
        f, saved_f = (rows + moe.n_shared_experts) * width, moe.n_shared_experts * width
        exchanged = 2 * rows * d if expert_shards > 1 else 0.0
    b = COMPUTE_BYTES[compute_dtype_name(cfg.model, backend)]
    if remat == "none":
        scores = 0 if flash_attention(cfg, backend) else 4 * heads * seq / tensor
        return 11 * d * 4 + (6 * f / tensor + scores + exchanged) * b
    if remat == "dots_saveable":
        return (8 * d + 2 * saved_f / tensor) * b
    return 2 * d * b


def block_counts(cfg: Config) -> dict[bool, int]:
    """{is a MoE block: how many blocks}: every block MoE, or one in model.moe.moe_every."""
    model = cfg.model
    moe_blocks = len(model.moe.moe_blocks(model.n_layers))
    return {kind: n for kind, n in ((False, model.n_layers - moe_blocks), (True, moe_blocks)) if n}


MOMENTS = {"adam": 2, "muon": 1, "none": 0}  # float32 optimizer-state arrays per parameter, by update rule


def per_device(cfg: Config, params_per_device: int, mesh_shape: dict[str, int],
               backend: str = "gpu", optimizer_bytes: float | None = None) -> dict[str, float]:
    """The estimate of the module docstring, in bytes, by component (`optimizer_bytes`:
    of `optimizer_state_per_device`; None counts Adam's two moments for every parameter)."""
    model, tensor = cfg.model, mesh_shape["tensor"]
    batch_shards = sharding.batch_shards(mesh_shape) * cfg.train.microbatches
    tokens = cfg.train.batch_size * cfg.data.seq_len / batch_shards
    per_token = functools.partial(block_bytes_per_token, cfg, tensor=tensor, backend=backend,
                                  expert_shards=mesh_shape.get("expert", 1))
    logits = tokens * model.vocab_size / tensor * 4
    blocks = block_counts(cfg)
    recompute = 0.0 if model.remat == "none" else max(tokens * per_token("none", moe_block=m) for m in blocks)
    optimizer = 8.0 * params_per_device if optimizer_bytes is None else optimizer_bytes
    saved = sum(n * tokens * per_token(model.remat, moe_block=m) for m, n in blocks.items())
    parts = {"params": 4.0 * params_per_device, "optimizer": optimizer,
             "gradients": 4.0 * params_per_device, "activations": saved,
             "logits or recompute": max(logits, recompute)}
    return {**parts, "total": sum(parts.values())}


def elements_per_device(spec, mesh: Mesh) -> dict[str, int]:
    """Parameter path -> elements one device holds under the storage rules (`spec`: a ModelSpec)."""
    return {path: math.prod(shape) // sharding.shard_count(sharding.logical_to_spec(axes, shape, mesh), mesh)
            for path, (axes, shape) in spec.params_by_path().items()}


def params_per_device(spec, mesh: Mesh) -> int:
    """P: parameter elements one device holds."""
    return sum(elements_per_device(spec, mesh).values())


def optimizer_state_per_device(spec, mesh: Mesh) -> float:
    """Bytes of optimizer state one device holds: float32 moments, as many as the table's
    update rule of each parameter keeps (sharded like the parameter)."""
    return sum(4.0 * MOMENTS[spec.table.rules[path].update] * n for path, n in elements_per_device(spec, mesh).items())


def available_per_device(devices: list) -> tuple[float, str]:
    """(bytes one device may use, where the figure comes from)."""
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return float(min(d.memory_stats()["bytes_limit"] for d in devices)), f"{devices[0].device_kind} memory"
    host = _host_available_bytes()
    return host / len(devices), f"{_gb(host)} of available host RAM shared by {len(devices)} CPU device(s)"


def _host_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_fits(cfg: Config, spec, mesh: Mesh) -> None:
    """Refuse, in one line with both figures, a step whose estimate exceeds device memory."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    estimate = per_device(cfg, params_per_device(spec, mesh), dict(mesh.shape), jax.default_backend(),
                          optimizer_state_per_device(spec, mesh))
    check_estimate(estimate, devices)


def check_estimate(estimate: dict[str, float], devices: list) -> None:
    """`estimate` (of `per_device`) against what each of `devices` has."""
    available, source = available_per_device(devices)
    if estimate["total"] > available:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in estimate.items() if k != "total")
        raise UserError(f"the run needs about {_gb(estimate['total'])} per device ({parts}; the dry-run "
                        f"estimate) but a device has {_gb(available)} ({source}); use a smaller model or batch, "
                        f"more devices, model.remat or train.microbatches, or --skip-memory-check to try anyway")
