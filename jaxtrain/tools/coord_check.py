"""The muP coordinate check (Yang et al. 2021, "Tensor Programs V", Fig. 5 and App. D.1).

Train the same config at several widths for a few steps and record, after every update,
the RMS (sqrt of the mean square coordinate) of: the token embeddings, each block's
attention and MLP branch outputs, and the logits, all on one fixed batch of real data.
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

from jaxtrain import sharding
from jaxtrain import train_step as ts
from jaxtrain.config import Config, MeshConfig
from jaxtrain.config_file import apply_overrides, from_dict
from jaxtrain.data import pipeline
from jaxtrain.data.sources import open_sources


def _shape_config(cfg: Config, width: int, depth: int, steps: int) -> Config:
    return from_dict(apply_overrides(cfg.to_dict(), [
        f"model.d_model={width}", f"model.n_layers={depth}", "model.dropout=0.0",
        "model.remat=none",
        "schedule.name=constant", "schedule.warmup_steps=0", f"train.steps={steps + 1}"]))


def _rms(x: jax.Array) -> jax.Array:
    return jax.numpy.sqrt(jax.numpy.mean(jax.numpy.square(x.astype(jax.numpy.float32))))


def activation_rms(params: Any, tokens: jax.Array, *, spec: ts.ModelSpec) -> dict[str, jax.Array]:
    """RMS of the embeddings, every block's attention/MLP outputs and the logits (no
    dropout, unpacked: the probe is one batch of plain windows)."""
    model = ts.bind_model(spec, params)
    positions = jax.numpy.broadcast_to(jax.numpy.arange(tokens.shape[1]), tokens.shape)
    x = model.embed_tokens(tokens)
    out = {"embedding": _rms(x)}
    for i in range(model.cfg.n_layers):
        block = model.layer(i)
        attended = block.attn(block.attn_norm(x), positions)[0]
        out[f"block{i}.attn"] = _rms(attended)
        x = x + block.residual * attended
        branch = block.mlp(block.mlp_norm(x))
        out[f"block{i}.mlp"] = _rms(branch)
        x = x + block.residual * branch
    out["logits"] = _rms(model.logits(x))
    return out


def _trace(cfg: Config, batches: list[np.ndarray], probe: np.ndarray) -> list[dict[str, float]]:
    """RMS after 0, 1, ..., len(batches) updates, on one device."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    state, step = steps.init(cfg, spec), steps.train
    measure = jax.jit(lambda p, t: activation_rms(p, t, spec=spec))
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
    iterator = pipeline.train_iterator(cfg, open_sources(cfg), 0, 1)  # every shape is valid: now compute
    batches = [next(iterator) for _ in range(steps)]
    probe = ts.batch_tokens(batches[0])[0][:, :-1]
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
