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

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.schema import Config, MeshConfig
from jaxtrain.model import sharding
from jaxtrain.model.transformer import Transformer
from jaxtrain.run.metrics import read_metrics
from jaxtrain.run.workdir import Layout, open_at_step

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
        return read_metrics(Layout(self.workdir).metrics)

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
    with open_at_step(workdir, step) as run:
        spec = ts.model_spec(run.cfg)
        mesh = loading_mesh(run.cfg, mesh_cfg)
        shardings = sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              spec.abstract_params, shardings)
        params = run.checkpointer.restore_params(run.step, target)
        meta = run.checkpointer.read_meta(run.step)
    return SavedRun(Path(workdir), run.cfg, spec, mesh, run.step, run.steps_saved, meta, params)
