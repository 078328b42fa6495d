"""`jaxtrain dry-run`: the plan of a run, from abstract shapes only (nothing is allocated,
nothing is compiled), so a cluster-sized config resolves in seconds on a laptop.

It reports the resolved config; parameters, in all and active per token (a mixture of
experts: without the routed experts a token is not sent to), by parametrization role with
their init std and learning-rate / weight-decay / Adam-epsilon multipliers; the mesh (for a simulated
device count) and every parameter's partition spec; model FLOPs per token and per step
(`flops.py`); tokens per step; the learning-rate schedule; and an estimate of memory per
device.

Memory per device: the estimate of `memory.py` (its docstring gives the formula), checked
against this machine's devices when the plan is for them, as `jaxtrain train` checks it.

Communication: collective bytes per device per step by kind from the analytic model of
`communication.py`; `--compile` also compiles the real step on that many simulated CPU
devices and counts its HLO (`hlo_collectives.py`) beside it; `--target` adds a roofline
(compute vs communication time) on a named accelerator (`accelerators.TARGETS`).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import jax
import yaml
from jax.sharding import AbstractMesh, AxisType

from jaxtrain import step as ts
from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.model import sharding
from jaxtrain.model.execution import compute_dtype_name
from jaxtrain.optim.schedules import lr_per_step, resolve
from jaxtrain.run import memory
from jaxtrain.tools import communication, flops, target_compile, targets

def abstract_mesh(cfg: Config, devices: int) -> AbstractMesh:
    """The config's mesh over `devices` simulated devices."""
    shape = sharding.mesh_shape(cfg.mesh, devices)
    return AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def collective_dtype_bytes(cfg: Config, backend: str) -> int:
    """Bytes per element the collectives move: the compute dtype's, but XLA:CPU moves bf16
    collectives as float32 (measured: `jaxtrain/hlo_collectives.py`)."""
    return 4 if backend == "cpu" else memory.COMPUTE_BYTES[compute_dtype_name(cfg.model, backend)]


def dry_run(cfg: Config, devices: int | None = None, backend: str | None = None, target: str | None = None,
            compile_step: bool = False, check_memory: bool = True) -> dict[str, Any]:
    """`jaxtrain dry-run`: the plan over `devices` (default: this machine's, or the target's)
    for `backend` (default: this machine's, or the target's platform).

    `compile_step` also compiles the step: for `target` (a `targets.TARGETS` name), with that
    target's compiler, for its devices (this process must have called
    `xla_flags.compile_for_targets` before jax started); otherwise on that many simulated CPU
    devices, which this process must have (`xla_flags.simulate_cpu_devices`). A plan for this
    machine's own devices is checked against their memory, as `jaxtrain train` would check
    it, unless `check_memory` is False; a plan compiled for a target is checked against the
    compiler's figure and the target's HBM (`target_compile.DoesNotFit`)."""
    chosen = targets.target(target) if target else None
    if chosen is not None:
        if devices not in (None, chosen.devices):
            raise UserError(f"--devices {devices}: --target {chosen.name} has {chosen.devices} devices")
        if backend not in (None, chosen.platform):
            raise UserError(f"--backend {backend}: --target {chosen.name} is {chosen.platform}")
        devices, backend = chosen.devices, chosen.platform
    count = devices or jax.device_count()
    compiled_on = None
    if compile_step and chosen is None:
        compiled_on = jax.devices("cpu")[:count]
        if len(compiled_on) < count:
            raise UserError(f"--compile --devices {count}: this process has {len(compiled_on)} CPU devices "
                            f"(its XLA_FLAGS fix --xla_force_host_platform_device_count)")
    result = plan(cfg, count, backend="cpu" if compiled_on else backend or jax.default_backend(),
                  target=chosen, compiled_on=compiled_on)
    if compile_step and chosen is not None:
        result["compiled"] = report = target_compile.compile_for(cfg, chosen)
        if not report["fits"]:
            raise target_compile.DoesNotFit(target_compile.refusal(report))
    if devices is None and backend is None and check_memory:
        memory.check_estimate(result["memory_per_device"], jax.local_devices())
    return result


def plan(cfg: Config, devices: int, backend: str = "gpu", target: targets.Target | None = None,
         compiled_on: list | None = None) -> dict[str, Any]:
    """Everything the dry run reports, as plain data. `target` adds the roofline;
    `compiled_on` (simulated CPU devices) adds the compiled step's
    collective bytes and temporary memory beside the analytic figures."""
    mesh = abstract_mesh(cfg, devices)
    sharding.check_batch_splits(cfg, dict(mesh.shape))  # train's preflight: refused there, refused here
    spec = ts.model_spec(cfg, backend)  # the model as compiled for `backend` devices
    comms = communication.analytic(cfg, spec, mesh, collective_dtype_bytes(cfg, backend), backend)
    extra: dict[str, Any] = {"communication": {"analytic": comms, "analytic_by_kind": communication.by_kind(comms)}}
    if target is not None:
        extra["roofline"] = communication.roofline(cfg, comms, devices, target.hardware)
    if compiled_on is not None:
        extra["communication"]["compiled"] = communication.measured(cfg, compiled_on)
    params, roles = [], collections.defaultdict(lambda: collections.defaultdict(set))
    role_counts: dict[str, int] = collections.Counter()
    by_path = spec.params_by_path()
    for path, rule in spec.table.rules.items():
        axes, shape = by_path[path]
        pspec = sharding.logical_to_spec(axes, shape, mesh)
        shards = sharding.shard_count(pspec, mesh)
        size = math.prod(shape)
        params.append({"path": path, "shape": list(shape), "role": rule.role, "logical_axes": list(axes),
                       "partition_spec": [s if s is None or isinstance(s, str) else list(s) for s in pspec],
                       "per_device": size // shards, "update": rule.update})
        role_counts[rule.role] += size
        for field in ("init_std", "multiplier", "lr", "weight_decay", "eps", "update", "muon_scale"):
            value = getattr(rule, field)
            roles[rule.role][field].add(value if isinstance(value, str) else round(value, 8))
    per_device = sum(p["per_device"] for p in params)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = flops.model_flops_per_token(cfg.model, cfg.data.seq_len)
    return {
        "config": cfg.to_dict(),
        "devices": devices,
        "mesh": dict(mesh.shape),
        "params_total": sum(role_counts.values()),
        "params_active": sum(role_counts.values()) - flops.idle_expert_params(cfg.model),
        "roles": {role: {"params": role_counts[role], **{k: sorted(v) for k, v in fields.items()}}
                  for role, fields in roles.items()},
        "params": params,
        "params_per_device": per_device,
        "flops_per_token": flops_per_token,
        "matmul_params": flops.matmul_params(cfg.model),
        "tokens_per_step": tokens_per_step,
        "flops_per_step": flops_per_token * tokens_per_step,
        "memory_per_device": memory.per_device(cfg, per_device, dict(mesh.shape), backend,
                                               memory.optimizer_state_per_device(spec, mesh)),
        "compute_dtype": compute_dtype_name(cfg.model, backend),
        "schedule": schedule_summary(cfg),
        **extra,
    }


def schedule_summary(cfg: Config) -> dict[str, Any]:
    steps, lrs, lengths = cfg.train.steps, lr_per_step(cfg), resolve(cfg)
    return {"name": cfg.schedule.name, "peak_lr": cfg.optimizer.lr, "warmup_steps": lengths.warmup / lengths.per_step,
            "steps": steps, "first_lr": float(lrs[0]), "final_lr": float(lrs[-1]),
            "tokens": steps * cfg.train.batch_size * cfg.data.seq_len}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _one_row_per_layer_kind(params: list[dict]) -> dict[str, dict]:
    """Parameters in model order, the stacked blocks' as blocks.*.NAME or dense_blocks.*.NAME
    (one row for every layer of the stack)."""
    return {re.sub(r"^((?:dense_)?blocks)\.", r"\1.*.", q["path"]): q for q in params}


def format_plan(p: dict[str, Any]) -> str:
    lines = ["# resolved config", yaml.safe_dump(p["config"], sort_keys=False).rstrip(), "",
             f"# parameters: {p['params_total']:,} ({_count(p['params_total'])}), "
             f"{p['params_active']:,} ({_count(p['params_active'])}) active per token, "
             f"{p['params_per_device']:,} per device",
             f"{'role':<10} {'params':>14}  {'init std':<24} {'multiplier':<18} {'lr x':<14} {'wd x':<10} "
             f"{'eps x':<10} {'update':<7} muon scale"]
    fmt = lambda values: ",".join(f"{v:.4g}" for v in values)
    for role, r in p["roles"].items():
        lines.append(f"{role:<10} {r['params']:>14,}  {fmt(r['init_std']):<24} {fmt(r['multiplier']):<18} "
                     f"{fmt(r['lr']):<14} {fmt(r['weight_decay']):<10} {fmt(r['eps']):<10} "
                     f"{','.join(r['update']):<7} {fmt(r['muon_scale']) if r['update'] == ['muon'] else '-'}")
    lines += ["", f"# mesh over {p['devices']} devices: {p['mesh']}",
              f"{'parameter (blocks.* = every layer)':<36} {'shape':<18} {'logical axes':<34} partition spec"]
    for path, q in _one_row_per_layer_kind(p["params"]).items():
        lines.append(f"{path:<36} {str(tuple(q['shape'])):<18} {str(tuple(q['logical_axes'])):<34} "
                     f"{tuple(q['partition_spec'])}")
    s, m = p["schedule"], p["memory_per_device"]
    lines += ["", "# compute",
              f"model FLOPs per token {p['flops_per_token']:.4g} (6N + 12 L H d_head T, N = "
              f"{p['matmul_params']:,} matmul params incl. the unembedding)",
              f"tokens per step {p['tokens_per_step']:,}; FLOPs per step {p['flops_per_step']:.4g}; "
              f"total {p['flops_per_step'] * s['steps']:.4g} over {s['steps']:,} steps ({_count(s['tokens'])} tokens)",
              "", f"# memory per device (estimate, compute dtype {p['compute_dtype']})"]
    lines += [f"{k:<12} {_bytes(v)}" for k, v in m.items()]
    lines += ["", f"# schedule: {s['name']}, peak lr {s['peak_lr']:g}, warmup {s['warmup_steps']:g} steps, "
                  f"lr at step 0 {s['first_lr']:.3g}, at the last step {s['final_lr']:.3g}"]
    return "\n".join(lines + _format_communication(p) + _format_target_compile(p))


def _format_communication(p: dict[str, Any]) -> list[str]:
    comms = p["communication"]
    lines = ["", "# collectives per device per step (analytic model, jaxtrain/communication.py)"]
    lines += [f"{name:<22} {_bytes(entry['bytes']):>12}  ({entry['kind']})" for name, entry in comms["analytic"].items()]
    if "compiled" in comms:
        lines += [""] + _by_kind_lines(comms["analytic_by_kind"], comms["compiled"]["bytes_by_kind"],
                                       f"  (step compiled on {p['devices']} simulated CPU devices)")
        lines.append(f"compiled temporary memory per device {_bytes(comms['compiled']['temp_bytes'])}")
    if "roofline" in p:
        r = p["roofline"]
        lines += ["", f"# roofline on {r['devices']} x {r['target']} ({r['assumptions']})",
                  f"compute {r['compute_s'] * 1e3:.3g} ms, communication {r['communication_s'] * 1e3:.3g} ms "
                  f"(ring traffic at {r['link_bytes_per_s'] / 1e9:g} GB/s): step >= {r['step_s'] * 1e3:.3g} ms, "
                  f"{r['bound']}-bound, MFU ceiling {r['mfu_ceiling']:.2f}"]
    return lines


def _format_target_compile(p: dict[str, Any]) -> list[str]:
    if "compiled" not in p:
        return []
    c, estimate = p["compiled"], p["memory_per_device"]["total"]
    m = c["memory"]
    lines = ["", f"# compiled for {c['target']}: {c['devices']} x {c['device_kind']} ({c['platform']} compiler, "
                 f"{c['compile_s']:.1f} s)",
             f"memory per device: arguments {_bytes(m['arguments'])} + outputs {_bytes(m['outputs'])} - aliased "
             f"{_bytes(m['aliased'])} + temporaries {_bytes(m['temporaries'])} = {_bytes(m['total'])} of "
             f"{_bytes(c['usable_hbm'])} usable: fits ({m['total'] / c['usable_hbm']:.0%}); the estimate above is "
             f"{_bytes(estimate)} (compiled / estimate {m['total'] / estimate:.2f})",
             f"attention kernel: {c['attention']['kernel']} ({c['attention']['custom_calls']} kernel calls)"]
    return lines + _by_kind_lines(p["communication"]["analytic_by_kind"], c["collectives"])


def _by_kind_lines(analytic: dict[str, float], compiled: dict[str, float], heading_note: str = "") -> list[str]:
    """Collective bytes by HLO op kind, the analytic model's beside a compiled step's, and their totals."""
    lines = [f"{'HLO op kind':<22} {'analytic':>12} {'compiled':>12}{heading_note}"]
    lines += [f"{kind:<22} {_bytes(analytic[kind]):>12} {_bytes(compiled[kind]):>12}"
              for kind in compiled if compiled[kind] or analytic[kind]]
    total_a, total_c = sum(analytic.values()), sum(compiled.values())
    lines.append(f"{'total':<22} {_bytes(total_a):>12} {_bytes(total_c):>12}  compiled / analytic "
                 f"{total_c / total_a if total_a else float('nan'):.3f}")
    return lines
