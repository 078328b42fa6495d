"""Collective bytes per device per step: an analytic model of what the sharding rules make
the train step move, the same count read off a compiled step's HLO, and a roofline.

The analytic model follows `sharding.py`'s two tables. For every parameter, c = its
elements per device in the COMPUTE layout (what a matmul reads: sharded over `tensor`, and
a mixture of experts' experts over `expert`; the router is read whole) and s = in the
STORAGE layout. With a mesh data x fsdp x expert x tensor = D x F x X x T, m microbatches,
b = bytes of the dtype the collectives move, n = B S / (D F X) tokens per device:

  parameter all-gather   m * g * c * b   for every weight stored sharded beyond its compute
                         layout (under FSDP: all of them), over the s -> c group.
                         g = 2 for the weights read inside the layer scan and the norm
                         gains (gathered in the forward pass and again in the backward:
                         ZeRO-3, `model._REMAT_POLICIES`), g = 1 for the token embedding and
                         the LM head (their gathered copy serves the backward pass too).
  gradient reduction     over the batch axes (D F X) the parameter's compute layout does
                         not split (expert weights: D F, they see other devices' tokens
                         through the exchange below), when more than one device,
                         per parameter and microbatch (each backward pass
                         sums its own gradients, as FSDP2 does; the TPU compiler sums
                         the LM head's once, after the loop), in r = bytes of train.grad_reduce_dtype
                         (`model/fsdp.py`; XLA:CPU always sums in float32, r = 4):
                         reduce-scattered onto the shard, s * r, on every backend (an
                         explicit psum_scatter); the token embedding's gradient moves as an
                         all-to-all of the device's tokens x d (all microbatches' together) in the compute dtype on GPU
                         and TPU, as an all-reduce + slice (c * r) on XLA:CPU; a weight
                         stored whole (pure data parallel) is all-reduced, c * r.
  tensor all-reduces     m * (4 L + 1) * (n / m) * d * b when T > 1: Megatron's
                         two per layer forward (attention and MLP outputs) and two backward
                         (their inputs' gradients; q/k/v and gate/up are fused matmuls, so
                         one each), plus the LM head input's gradient.
  expert all-to-all      when X > 1 (model/moe_dispatch.py): per MoE layer and microbatch,
                         g exchanges of a (X, C, d) buffer, C = (n / m) min(k, E / X) the
                         dropless capacity per destination: dispatch and combine forward,
                         their transposes backward (g = 4), and the forward two again where
                         the remat policy recomputes them (full, dots_saveable: g = 6); plus
                         the (X, E / X) int32 counts once per forward pass:
                             L * (g X n min(k, E/X) d b + m (g - 2)/2 * 4 E)

Not counted (each under 1% here): the loss's (B, S) reductions over a vocab-sharded
`tensor` axis and the scalar all-reduces of the gradient norm and metrics.

Sizes are "output bytes per device" like `hlo_collectives`, so the two are comparable. The
roofline turns them into time with ring algorithms, traffic per device = c (n-1)/n for a
gather or reduce-scatter over n devices and 2 c (n-1)/n for an all-reduce, at the target's
link bandwidth, and compares it with compute time = model FLOPs per device / bf16 peak (both
from the one table of `accelerators.py`):

    step time >= max(compute, communication)     (perfect overlap; no kernel overheads)
"""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxtrain import step as ts
from jaxtrain.config.schema import Config
from jaxtrain.model import sharding
from jaxtrain.tools import flops, hlo_collectives
from jaxtrain.tools.accelerators import Accelerator

# Gathered once per step: their gathered copy serves the backward pass too (the block weights, outside this tuple, are gathered again there).
_GATHERED_ONCE = ("embed", "lm_head")
# Forward passes of a MoE layer per microbatch, by model.remat: `none` keeps both exchanges'
# outputs for the backward pass, the others run the forward exchanges again there.
_FORWARD_EXCHANGES = {"none": 1, "dots_saveable": 2, "full": 2}


def _compute_spec(path: str, axes: tuple, shape: tuple, mesh: Any, role: str) -> Any:
    if path == "embed" or role == "router":  # the lookup reads the whole table (model.Transformer.embed_tokens);
        return jax.sharding.PartitionSpec()  # every device routes its own tokens over all experts (model/moe.py)
    return sharding.logical_to_spec(axes, shape, mesh, sharding.COMPUTE_RULES)


def _mesh_axes(spec: Any) -> set[str]:
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def expert_exchange(cfg: Config, mesh: Any, collective_bytes: int) -> float:
    """Bytes per device per step of the MoE token exchange (module docstring; the formula's
    derivation is model/moe_dispatch.py's): 0 without experts split over `expert`."""
    moe, shards = cfg.model.moe, mesh.shape["expert"]
    if not moe.enabled or shards == 1:
        return 0.0
    tokens = cfg.train.batch_size * cfg.data.seq_len / sharding.batch_shards(mesh.shape)
    forward, local = _FORWARD_EXCHANGES[cfg.model.remat], moe.n_experts // shards
    exchanges = 2 * forward + 2  # dispatch + combine per forward pass, and their transposes
    rows = shards * tokens * min(moe.top_k, local)  # X * C, summed over the microbatches
    counts = cfg.train.microbatches * forward * 4 * moe.n_experts  # int32 (X, E / X) per forward pass
    return cfg.model.n_layers * (exchanges * rows * cfg.model.d_model * collective_bytes + counts)


def analytic(cfg: Config, spec: ts.ModelSpec, mesh: Any, collective_bytes: int,
             backend: str = "cpu") -> dict[str, dict[str, float]]:
    """{category: {"bytes", "traffic", "kind"}} per device per step (module docstring) of the
    step as `backend` ("cpu", "gpu" or "tpu") compiles it."""
    t, micro = mesh.shape["tensor"], cfg.train.microbatches
    tokens = cfg.train.batch_size * cfg.data.seq_len / sharding.batch_shards(mesh.shape)
    gather = gather_traffic = 0.0
    grads = {"all-reduce": 0.0, "reduce-scatter": 0.0, "all-to-all": 0.0}
    grads_traffic = 0.0
    for path, (axes, shape) in spec.params_by_path().items():
        stored = sharding.shard_count(sharding.logical_to_spec(axes, shape, mesh), mesh)
        compute_spec = _compute_spec(path, axes, shape, mesh, spec.table.rules[path].role)
        computed = sharding.shard_count(compute_spec, mesh)
        c = math.prod(shape) / computed
        if stored > computed:
            times = micro * (1 if path in _GATHERED_ONCE else 2)
            n = stored // computed
            gather += times * c * collective_bytes
            gather_traffic += times * c * collective_bytes * (n - 1) / n
        summed_over = math.prod(mesh.shape[a] for a in sharding.COMPUTE_RULES["batch"]
                                if a not in _mesh_axes(compute_spec))
        if summed_over == 1:
            continue
        for kind, size, traffic in _gradient_reduction(cfg, path, c, stored // computed, summed_over, tokens,
                                                       backend, collective_bytes):
            # each microbatch's backward pass sums its gradients, except where the compiler
            # sums once after the microbatch loop: the all-to-all's tokens are all
            # microbatches' already, and the TPU compiler hoists the LM head's
            # reduce-scatter out of the loop (a sum of reduce-scatters is one of the sum)
            once = kind == "all-to-all" or (backend == "tpu" and path == "lm_head")
            times = 1 if once else micro
            grads[kind] += times * size
            grads_traffic += times * traffic
    tensor = (4 * cfg.model.n_layers + 1) * tokens * cfg.model.d_model * collective_bytes if t > 1 else 0.0
    exchange, shards = expert_exchange(cfg, mesh, collective_bytes), mesh.shape["expert"]
    return {
        "parameter all-gather": {"bytes": gather, "traffic": gather_traffic, "kind": "all-gather"},
        **{f"gradient {kind}": {"bytes": size, "traffic": grads_traffic * size / sum(grads.values()), "kind": kind}
           for kind, size in grads.items() if size},
        "tensor all-reduce": {"bytes": tensor, "traffic": tensor * 2 * (t - 1) / t, "kind": "all-reduce"},
        **({"expert all-to-all": {"bytes": exchange, "traffic": exchange * (shards - 1) / shards, "kind": "all-to-all"}}
           if exchange else {}),
    }


def _gradient_reduction(cfg: Config, path: str, c: float, n: int, batch_devices: int, tokens: float,
                        backend: str, collective_bytes: int) -> list[tuple[str, float, float]]:
    """[(kind, output bytes, ring traffic)] of one parameter's gradient sum over the
    `batch_devices` devices its compute layout does not split.

    A weight stored sharded (n > 1) is reduce-scattered onto its shard c / n, in
    train.grad_reduce_dtype (`model/fsdp.py`'s explicit psum_scatter; XLA:CPU computes and
    sums in float32), and that shard all-reduced over the other batch devices (data, and
    expert for the weights it does not split: `fsdp._weight_gradient`'s psum); the token
    embedding's gradient (a scatter-add of the batch's rows) is
    instead moved on GPU and TPU as an all-to-all of the device's tokens x d_model in the
    compute dtype, each device adding up its own columns, and all-reduced whole (then
    sliced) by XLA:CPU; a weight stored whole (pure data parallel) is all-reduced. (The TPU
    compiler emits the reduce-scatter only because `model/fsdp.py` writes it as an explicit
    psum_scatter: left to its partitioner it all-reduced the whole gradient and sliced.)"""
    reduce_bytes = 4 if backend == "cpu" else {"float32": 4, "bfloat16": 2}[cfg.train.grad_reduce_dtype]
    ring = lambda devices: (devices - 1) / devices  # noqa: E731
    if path == "embed" and backend != "cpu" and n > 1:
        size = tokens * cfg.model.d_model * collective_bytes
        return [("all-to-all", size, size * ring(batch_devices))]
    if n == 1 or path == "embed":
        return [("all-reduce", c * reduce_bytes, 2 * c * reduce_bytes * ring(batch_devices))]
    shard, rest = c / n * reduce_bytes, batch_devices // n
    return [("reduce-scatter", shard, c * reduce_bytes * ring(n))] + (
        [("all-reduce", shard, 2 * shard * ring(rest))] if rest > 1 else [])


def by_kind(model: dict[str, dict[str, float]]) -> dict[str, float]:
    """The analytic categories summed by HLO op kind (as `hlo_collectives` counts them)."""
    kinds = dict.fromkeys(hlo_collectives.KINDS, 0.0)
    for entry in model.values():
        kinds[entry["kind"]] += entry["bytes"]
    return kinds


def roofline(cfg: Config, model: dict[str, dict[str, float]], devices: int, target: Accelerator) -> dict[str, Any]:
    """Compute and communication time of one step on `devices` of `target`, and their max."""
    flops_per_device = flops.model_flops_per_token(cfg.model, cfg.data.seq_len) * (
        cfg.train.batch_size * cfg.data.seq_len) / devices
    bandwidth = target.link_bytes_per_s if devices <= target.devices_per_node else target.internode_bytes_per_s
    traffic = sum(entry["traffic"] for entry in model.values())
    compute_s, comm_s = flops_per_device / target.bf16_flops, traffic / bandwidth
    return {"target": target.name, "devices": devices, "link_bytes_per_s": bandwidth,
            "compute_s": compute_s, "communication_s": comm_s, "step_s": max(compute_s, comm_s),
            "bound": "compute" if compute_s >= comm_s else "communication",
            "mfu_ceiling": compute_s / max(compute_s, comm_s), "assumptions": target.note}


def compiled_step(cfg: Config, mesh: Any) -> Any:
    """The train step compiled for `mesh` from abstract arguments (nothing is allocated): the
    loop's program for the platform of `mesh`'s devices, its batch packed under data.packing
    (`step.Steps.compile_train`)."""
    return ts.build_steps(cfg, ts.model_spec(cfg, mesh.devices.flat[0].platform), mesh).compile_train()


def measured(cfg: Config, devices: list) -> dict[str, Any]:
    """Collective bytes by kind, and temporary memory, of the step compiled on `devices`."""
    compiled = compiled_step(cfg, sharding.make_mesh(cfg.mesh, devices))
    text = compiled.as_text()
    return {"bytes_by_kind": hlo_collectives.bytes_by_kind(text),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
