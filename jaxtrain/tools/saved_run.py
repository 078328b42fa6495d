"""A run read back from its workdir: resolved config, metrics, and the parameters of any
saved checkpoint placed on this machine's devices, whatever mesh wrote them.

    run = load_run("runs/small")            # newest checkpoint
    run = load_run("runs/small", step=200)  # a chosen one
    run.cfg, run.step, run.params, run.metrics(), run.model()

Only the parameters are read (not the optimizer state), restored by orbax straight into
the target shardings of the loading mesh: by default the run's own mesh when this
machine has the devices for it, else a single device. Nothing in the workdir is written.
This is what `jaxtrain eval`, `jaxtrain generate` and `notebooks/inspect.ipynb` use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxtrain import sharding
from jaxtrain import train_step as ts
from jaxtrain.checkpoint import Checkpointer, quiet_absl
from jaxtrain.config import Config, MeshConfig
from jaxtrain.config_file import read_run_config
from jaxtrain.errors import ConfigError, UserError
from jaxtrain.metrics import read_metrics
from jaxtrain.model import Transformer

SINGLE_DEVICE = MeshConfig(data=1, fsdp=1, tensor=1)


@dataclasses.dataclass(frozen=True)
class SavedRun:
    workdir: Path
    cfg: Config
    spec: ts.ModelSpec
    mesh: Mesh
    step: int
    steps_saved: tuple[int, ...]
    meta: dict  # the checkpoint's metadata: tokens seen, config, parametrization table
    params: Any  # nested dict of float32 arrays on `mesh`

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def metrics(self) -> list[dict]:
        """Rows of metrics.jsonl (one per logged step)."""
        return read_metrics(self.workdir / "metrics.jsonl")

    def model(self) -> Transformer:
        """The NNX module with the checkpoint's weights (parametrization multipliers applied)."""
        return ts.bind_model(self.spec, self.params)


def loading_mesh(cfg: Config, mesh_cfg: MeshConfig | None = None) -> Mesh:
    """`mesh_cfg`, else the run's own mesh if it fits these devices, else one device."""
    if mesh_cfg is not None:
        return sharding.make_mesh(mesh_cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch_divides(cfg, mesh)
        return mesh
    except ConfigError:
        return sharding.make_mesh(SINGLE_DEVICE, jax.devices()[:1])


def load_run(workdir: str | Path, step: int | None = None, mesh_cfg: MeshConfig | None = None) -> SavedRun:
    """Read a run's config and the parameters of checkpoint `step` (default: newest)."""
    workdir = Path(workdir)
    cfg = read_run_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise UserError(f"{workdir}: has no checkpoints yet")
    with quiet_absl():  # orbax warns that a read-only manager will not save or delete
        ckpt = Checkpointer(workdir, cfg.checkpoint, read_only=True)
    try:
        saved = tuple(sorted(ckpt.all_steps()))
        if not saved:
            raise UserError(f"{workdir}: has no complete checkpoint yet")
        step = saved[-1] if step is None else step
        if step not in saved:
            raise UserError(f"--step {step}: no checkpoint at that step in {workdir} (saved: {list(saved)})")
        spec = ts.model_spec(cfg)
        mesh = loading_mesh(cfg, mesh_cfg)
        shardings = sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              spec.abstract_params, shardings)
        params = ckpt.restore_params(step, target)
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    return SavedRun(workdir, cfg, spec, mesh, step, saved, meta, params)
