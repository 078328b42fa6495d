"""`jaxtrain import`: a Hugging Face model directory as a new jaxtrain workdir whose step-0
checkpoint is that model (the reading itself is jaxtrain/huggingface/importer.py).

    plan = plan_import(HF_DIR, WORKDIR, CONFIG, overrides)   # every check; nothing written
    (join the process group)
    result = run_import(plan)                                 # the workdir, step 0, its val_loss

The config's model section is replaced by the directory's architecture (in model.moe the
routing; aux_loss and router_z_loss, which shape training only, stay CONFIG's) and
`train.init_from.huggingface` names the directory; everything else (data, parametrization,
optimizer, schedule) comes from CONFIG (default: jaxtrain's defaults). The run is
`train.run(stop_after=0)`: it checkpoints step 0 and evaluates it.

The workdir must be new (absent, empty, or holding only its lock file), with one
exception: an import killed before it finished (SIGKILL, a lost node) leaves a workdir that
is neither new nor a run (no config.yaml yet, `eval` cannot read it). So import owns the
workdir (workdir.owned: a live importer or run is refused in one line naming it) and marks
it (`.jaxtrain-import`) before writing anything, removing the mark once step 0 is saved and
evaluated. An owner that finds a mark is therefore looking at a dead import's leftover: with
no checkpoint past step 0 it is removed and the import starts over. A workdir trained past
step 0 and any workdir without the mark (someone's run) are refused and left as they are.
An import that fails with an error removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from jaxtrain.config.errors import UserError
from jaxtrain.config.files import apply_overrides, from_dict, load_config
from jaxtrain.config.schema import Config
from jaxtrain.huggingface.importer import HfModel, check_vocabulary, open_model
from jaxtrain.run.loop import RunResult, run
from jaxtrain.run.workdir import Layout, owned

MARKER = ".jaxtrain-import"


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    """A checked import: the source, the run's config and where it goes."""

    model: HfModel
    cfg: Config
    workdir: Path


def check_workdir(workdir: Path) -> bool:
    """Refuse a workdir import must not write; True when it holds a killed import's
    leftover (only its owner may tell, and start over), False when it is new."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: exists and is not a directory")
    held = [p for p in workdir.iterdir() if p != Layout(workdir).owner] if workdir.exists() else []
    if not held:
        return False
    if not (workdir / MARKER).exists():
        raise UserError(f"--workdir {workdir}: already exists and is not empty (import makes a new workdir)")
    trained = [step for step in _checkpoint_steps(workdir) if step > 0]
    if trained:
        raise UserError(f"--workdir {workdir}: an unfinished import's, but it holds checkpoint step {max(trained)} "
                        f"(trained since); remove {workdir / MARKER} to keep it as a run")
    return True


def _checkpoint_steps(workdir: Path) -> list[int]:
    """The steps of the checkpoint directories in `workdir` (orbax names them by step)."""
    checkpoints = Layout(workdir).checkpoints
    return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []


def import_config(model: HfModel, config: str | None, overrides: list[str]) -> Config:
    """CONFIG (or the defaults) with `--set` applied, the model section the directory's."""
    base = load_config(config, overrides) if config else from_dict(apply_overrides({}, overrides))
    raw = base.to_dict()
    raw["model"].update({key: value for key, value in model.fields.items() if key != "moe"})
    raw["model"]["moe"].update(model.fields["moe"])  # the routing is the model's, the loss coefficients CONFIG's
    raw["train"]["init_from"] = {"huggingface": str(model.directory.absolute())}
    return from_dict(raw)


def plan_import(hf_dir: str | Path, workdir: str | Path, config: str | None, overrides: list[str]) -> ImportPlan:
    """Every check that needs no device: the workdir, the model directory, the config and
    the vocabulary (before run() would blame model.vocab_size, which comes from HF_DIR)."""
    workdir = Path(workdir)
    check_workdir(workdir)
    model = open_model(hf_dir)
    cfg = import_config(model, config, overrides)
    check_vocabulary(cfg, model)
    return ImportPlan(model, cfg, workdir)


def run_import(plan: ImportPlan) -> RunResult:
    """Own the workdir, mark it (process 0), checkpoint and evaluate step 0, unmark it."""
    lead, existed = jax.process_index() == 0, plan.workdir.exists()
    with owned(plan.workdir, "import"):
        if lead:
            _mark(plan.workdir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxtrain import: workdir marked")
        try:
            result = run(plan.cfg, plan.workdir, stop_after=0, command="import")
        except BaseException:  # nothing of a failed import stays (a workdir it made goes whole)
            if lead and existed:
                _remove_all_but_the_lock(plan.workdir)
            elif lead:
                shutil.rmtree(plan.workdir)
            raise
        if lead:
            (plan.workdir / MARKER).unlink()
    return result


def _mark(workdir: Path) -> None:
    """Under the lock: clear a killed import's leftover (checked again: the workdir may have
    changed since the plan), then mark the workdir as an import in progress."""
    if check_workdir(workdir):
        _remove_all_but_the_lock(workdir)
    (workdir / MARKER).touch()


def _remove_all_but_the_lock(workdir: Path) -> None:
    for entry in workdir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry != Layout(workdir).owner:
            entry.unlink()
