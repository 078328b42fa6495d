"""The muP coordinate check (Yang et al. 2021, "Tensor Programs V", Fig. 5 and App. D.1).

Train the same config at several widths for a few steps and record, after every update,
the RMS (sqrt of the mean square coordinate) of: the token embeddings, each block's
attention and MLP branch outputs, and the logits, all on one fixed batch of real data
(packed, and seen through its document mask, when `data.packing` is on).
Under a correct muP every curve is flat in width (log-log slope near 0) at every step;
under SP the logits (and the hidden updates) grow with width after the first update.

Each width trains with the config's optimizer and parametrization on a constant learning
rate (no warmup, no dropout), so a few steps move the weights by a full learning rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtrain import step as ts
from jaxtrain.config.files import apply_overrides, from_dict
from jaxtrain.config.schema import Config, MeshConfig
from jaxtrain.data import pipeline
from jaxtrain.data.sources import open_sources
from jaxtrain.model import sharding
from jaxtrain.model.transformer import forward_sown, rms


def _shape_config(cfg: Config, width: int, depth: int, steps: int) -> Config:
    return from_dict(apply_overrides(cfg.to_dict(), [
        f"model.d_model={width}", f"model.n_layers={depth}", "model.dropout=0.0",
        "model.remat=none",
        "schedule.name=constant", "schedule.warmup_steps=0", f"train.steps={steps + 1}"]))


def activation_rms(params: Any, batch: Any, *, spec: ts.ModelSpec) -> dict[str, jax.Array]:
    """RMS of the embeddings, every block's attention/MLP outputs and the logits, as the
    model's forward pass sows them: no dropout, the batch's document mask if it is packed."""
    inputs, segment_ids = ts.model_inputs(batch)
    names = ("embedding_rms", "attn_rms", "mlp_rms")
    logits, sown = forward_sown(ts.bind_model(spec, params), inputs, names, segment_ids)
    out = {"embedding": sown["embedding_rms"]}
    for i, (attn, mlp) in enumerate(zip(sown["attn_rms"], sown["mlp_rms"], strict=True)):
        out[f"block{i}.attn"], out[f"block{i}.mlp"] = attn, mlp
    out["logits"] = rms(logits)
    return out


def _trace(cfg: Config, batches: list[Any], probe: Any) -> list[dict[str, float]]:
    """RMS after 0, 1, ..., len(batches) updates, on one device."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    state, step = steps.init(), steps.train
    measure = jax.jit(lambda params, batch: activation_rms(params, batch, spec=spec))
    trace = [measure(state.params, probe)]
    lr = np.float32(cfg.optimizer.lr)  # the check runs a constant schedule without warmup
    for batch in batches:
        state, _ = step(state, batch, lr)
        trace.append(measure(state.params, probe))
    return [{k: float(row[k]) for k in _in_network_order(row)} for row in jax.device_get(trace)]


def _in_network_order(names) -> list[str]:
    """embedding, block0.attn, block0.mlp, ..., logits (pytrees hand dict keys back sorted)."""
    def position(name: str) -> tuple:
        if name.startswith("block"):
            index, _, part = name[5:].partition(".")
            return (1, int(index), part)
        return (0 if name == "embedding" else 2, 0, name)
    return sorted(names, key=position)


def slope(widths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log2(value) against log2(width); None where a value is 0
    (e.g. the logits of a zero-initialized readout before the first update)."""
    if min(values) <= 0:
        return None
    return float(np.polyfit(np.log2(widths), np.log2(values), 1)[0])


def coord_check(cfg: Config, widths: list[int], depths: list[int] | None, steps: int,
                out: Path | None = None) -> dict[str, Any]:
    depths = depths or [cfg.model.n_layers]
    shapes = {(depth, width): _shape_config(cfg, width, depth, steps) for depth in depths for width in widths}
    if out is not None:
        from jaxtrain.tools.plotting import check_available

        check_available()  # before any width trains
    iterator = pipeline.TrainBatches(cfg, open_sources(cfg), 0, 1)  # every shape is valid: now compute
    batches = [next(iterator) for _ in range(steps)]
    probe = batches[0]  # tokens, and segment ids when packed
    records = []
    for depth in depths:
        for width in widths:
            trace = _trace(shapes[depth, width], batches, probe)
            records += [{"width": width, "depth": depth, "step": t, "rms": rms} for t, rms in enumerate(trace)]
    report = {"parametrization": cfg.parametrization.name, "widths": widths, "depths": depths,
              "steps": steps, "lr": cfg.optimizer.lr, "records": records,
              **_slopes(records, widths, depths[0], steps)}
    if out is not None:
        _write(report, Path(out))
    return report


def _slopes(records: list[dict], widths: list[int], depth: int, steps: int) -> dict[str, Any]:
    """Slopes vs width at one depth: {"names": [...], "slopes": {step: {name: slope}}}."""
    rows = [r for r in records if r["depth"] == depth]
    names = list(rows[0]["rms"])
    slopes = {}
    for t in range(steps + 1):
        at_t = sorted((r for r in rows if r["step"] == t), key=lambda r: r["width"])
        slopes[str(t)] = {n: slope(widths, [r["rms"][n] for r in at_t]) for n in names}
    return {"names": names, "slope_depth": depth, "slopes": slopes}


def _write(report: dict[str, Any], out: Path) -> None:
    from jaxtrain.tools.plotting import plot_coord_check

    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(report, indent=1))
    for depth in report["depths"]:
        one_depth = {**report, **_slopes(report["records"], report["widths"], depth, report["steps"]),
                     "records": [r for r in report["records"] if r["depth"] == depth]}
        name = "coord_check.png" if len(report["depths"]) == 1 else f"coord_check_L{depth}.png"
        plot_coord_check(one_depth, out / name)
