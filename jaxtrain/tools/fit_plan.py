"""`jaxtrain dry-run CONFIG --target NAME --fit`: the fastest way to run a config on a target
whose compiled program fits the target's memory, as the `--set` overrides that select it.

The execution options that trade memory for time without changing the run's mathematics:

  model.remat          none | dots_saveable | full: what the backward pass recomputes
  train.microbatches   m: the batch in m sequential pieces, gradients accumulated

Each plan's step time is predicted by the roofline (`communication.roofline`):
max(compute, communication), where

  compute        model FLOPs / peak x r,  r = 1 (none), 1 (dots_saveable: only elementwise
                 work is recomputed), 4/3 (full: one more forward pass, 2N of 6N per token)
  communication  the analytic collectives of that plan (FSDP gathers every weight again
                 for each microbatch, so more microbatches cost more traffic)

Plans are tried fastest first and compiled with the target's compiler; the first whose
compiled memory fits is the answer (ties go to fewer microbatches, then less recomputation).
A plan whose shape-only estimate (`run/memory.py`) exceeds 1.5x the usable memory is not
compiled: the estimate is held within 1.3x of the compiler's figure by the test suite.
"""

from __future__ import annotations

from typing import Any

from jaxtrain import step as ts
from jaxtrain.config.errors import UserError
from jaxtrain.config.files import apply_overrides, from_dict
from jaxtrain.config.schema import Config
from jaxtrain.model import sharding
from jaxtrain.run import memory
from jaxtrain.tools import communication, target_compile, targets
from jaxtrain.tools.dry_run import abstract_mesh, collective_dtype_bytes

RECOMPUTE = {"none": 1.0, "dots_saveable": 1.0, "full": 4 / 3}
_SKIP_ABOVE = 1.5  # x usable memory: not compiled


def candidates(cfg: Config, devices: int) -> list[Config]:
    """Every (remat, microbatches) the config allows on `devices`: m divides each batch shard."""
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, devices)))
    rows_per_shard = cfg.train.batch_size // sharding.batch_shards(shape)
    found = []
    for remat in RECOMPUTE:
        m = 1
        while m <= rows_per_shard:
            if rows_per_shard % m == 0:
                found.append(from_dict(apply_overrides(cfg.to_dict(), [f"model.remat={remat}",
                                                                       f"train.microbatches={m}"])))
            m *= 2
    return found


def predict(cfg: Config, target: targets.Target) -> dict[str, Any]:
    """The plan's roofline step time and shape-only memory estimate."""
    mesh = abstract_mesh(cfg, target.devices)
    spec = ts.model_spec(cfg, target.platform)
    comms = communication.analytic(cfg, spec, mesh, collective_dtype_bytes(cfg, target.platform), target.platform)
    roof = communication.roofline(cfg, comms, target.devices, target.hardware)
    compute_s = roof["compute_s"] * RECOMPUTE[cfg.model.remat]
    estimate = memory.per_device(cfg, memory.params_per_device(spec, mesh), dict(mesh.shape), target.platform,
                                 memory.optimizer_state_per_device(spec, mesh))["total"]
    return {"remat": cfg.model.remat, "microbatches": cfg.train.microbatches, "step_s": max(compute_s, roof["communication_s"]),
            "compute_s": compute_s, "communication_s": roof["communication_s"], "estimate": estimate}


def fit(cfg: Config, target: targets.Target) -> dict[str, Any]:
    """{"plans": every plan with its prediction (and compiled memory where compiled),
    "chosen": the fastest that fits, "overrides": its --set flags}; refused in one line if none fits."""
    usable = target.hardware.hbm_bytes
    plans = sorted(((predict(c, target), c) for c in candidates(cfg, target.devices)),
                   key=lambda pc: (round(pc[0]["step_s"], 9), pc[0]["microbatches"], RECOMPUTE[pc[0]["remat"]]))
    rows, chosen = [], None
    for prediction, candidate in plans:
        row = dict(prediction)
        if chosen is None and prediction["estimate"] <= _SKIP_ABOVE * usable:
            report = target_compile.compile_for(candidate, target)
            row["compiled"] = report["memory"].get("total")
            row["fits"] = report["fits"]
            if report["fits"]:
                chosen = row
        rows.append(row)
    if chosen is None:
        raise UserError(f"--fit: no remat x microbatches plan of this config fits {target.name} "
                        f"({_gib(usable)} usable per device); use more devices, a smaller batch or model")
    overrides = [f"--set model.remat={chosen['remat']}", f"--set train.microbatches={chosen['microbatches']}"]
    return {"target": target.name, "usable_hbm": usable, "plans": rows, "chosen": chosen,
            "overrides": " ".join(overrides)}


def format_fit(result: dict[str, Any]) -> str:
    lines = [f"# plans for {result['target']} ({_gib(result['usable_hbm'])} usable per device), fastest first",
             f"{'remat':<14} {'micro':>5} {'step (roofline)':>16} {'estimate':>11} {'compiled':>11}  fits"]
    for row in result["plans"]:
        compiled = _gib(row["compiled"]) if row.get("compiled") else "-"
        fits = {True: "yes", False: "no"}.get(row.get("fits"), "not compiled")
        lines.append(f"{row['remat']:<14} {row['microbatches']:>5} {row['step_s'] * 1e3:>13.1f} ms "
                     f"{_gib(row['estimate']):>11} {compiled:>11}  {fits}")
    lines.append(f"fastest plan that fits: {result['overrides']}")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
