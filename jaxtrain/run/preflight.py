"""Every check that can refuse a config before anything is compiled or written, in one
place for the commands that build a step from a config: `jaxtrain train` (and cooldown,
import), `jaxtrain bench` and `jaxtrain eval`. A config one of them refuses, the others
refuse with the same line.

    compute      model/execution.check: the attention kernel runs on the mesh's devices
    mesh         sharding.check_batch_divides: batch and its microbatches split over the mesh
    data         pipeline.check_fits: every source has windows of seq_len+1 for the splits read
    memory       memory.check_fits: the estimate fits the devices (train only, opt-out)

`jaxtrain train` adds `preflight_training` (W&B, the workdir writable, train.init_from)
and, once the workdir's checkpoints are open, `check_resumable` (config.IDENTITY_SECTIONS).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from jax.sharding import Mesh

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.files import read_yaml_mapping
from jaxtrain.config.resume import identity_difference
from jaxtrain.config.schema import Config
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource
from jaxtrain.model import parametrization, sharding
from jaxtrain.model.parametrization import Table
from jaxtrain.model import execution
from jaxtrain.run import memory, rewarm
from jaxtrain.run.checkpoint import Checkpointer, quiet_absl
from jaxtrain.run.metrics import check_wandb
from jaxtrain.run.workdir import Layout

BOTH_SPLITS = ("train", "validation")


def preflight(cfg: Config, mesh: Mesh, sources: list[DataSource] | None = None, *,
              splits: Sequence[str] = BOTH_SPLITS, check_memory: bool = False) -> ts.ModelSpec:
    """The model spec of `cfg` once every check has passed. `sources`: the data the command
    reads (None: bench, which times synthetic tokens), of which it reads `splits`."""
    platform = mesh.devices.flat[0].platform  # the devices compiled for, maybe not this process's
    execution.check(cfg, platform)
    sharding.check_batch_divides(cfg, mesh)
    if sources is not None:
        pipeline.check_fits(cfg, sources, splits)
    spec = ts.model_spec(cfg, platform)
    if check_memory:
        memory.check_fits(cfg, spec, mesh)
    return spec


def preflight_training(cfg: Config, mesh: Mesh, sources: list[DataSource], workdir: Path, *,
                       check_memory: bool = True) -> ts.ModelSpec:
    """`preflight` and what training adds: W&B importable if asked for, the workdir
    writable, train.init_from readable and compatible, and the workdir's run resumable by
    this config (read-only, before the workdir is owned: a refused resume leaves even the
    lock file as it was; the loop checks again once it owns the workdir)."""
    check_wandb(cfg.train.wandb_project)
    spec = preflight(cfg, mesh, sources, check_memory=check_memory)
    check_writable(workdir)
    rewarm.check_before_start(cfg, spec.table, workdir)
    if Layout(workdir).has_checkpoints():
        with quiet_absl():
            ckpt = Checkpointer(Layout(workdir).checkpoints, cfg.checkpoint, read_only=True)
        try:
            check_resumable(workdir, cfg, spec.table, ckpt)
        finally:
            ckpt.close()
    return spec


def check_writable(workdir: Path) -> None:
    """One line, before anything is compiled, if this process could not write the run: the
    workdir and its checkpoints if they exist, else the nearest directory above that does
    (probed by creating a file: permission bits alone do not say what root, ACLs or a
    read-only mount allow)."""
    existing = [d for d in (Layout(workdir).checkpoints, workdir) if d.is_dir()]
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: exists and is not a directory")
    if not existing:
        existing = [next(p for p in workdir.absolute().parents if p.exists())]
        if not existing[0].is_dir():
            raise UserError(f"--workdir {workdir}: {existing[0]} is not a directory")
    for directory in existing:
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as err:
            raise UserError(f"--workdir {workdir}: cannot write in {directory} ({err.strerror})") from None


def check_resumable(workdir: Path, cfg: Config, table: Table, ckpt: Checkpointer) -> None:
    """Refuse to resume a run whose identity fields (config.IDENTITY_SECTIONS) or
    parametrization table differ from what its newest checkpoint was trained with (its
    meta; the workdir's config.yaml for checkpoints written before the meta held the
    config), before anything is written; `record_run` writes once every check has passed."""
    meta = ckpt.newest_meta()
    if meta is None:
        return
    path = Layout(workdir).config
    recorded = read_yaml_mapping(path, "the run's config") if path.exists() else None  # a corrupt one is named
    trained = meta.get("config") or recorded
    difference = identity_difference(cfg.to_dict(), trained) if trained else None
    if difference:
        key, old, value = difference
        raise ConfigError(key, f"workdir {workdir} holds a run with {old!r}, "
                               f"this config says {value!r}; use a new --workdir")
    saved_table = meta.get("parametrization")
    if saved_table is not None:
        parametrization.check_matches(saved_table, table)
