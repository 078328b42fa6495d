"""`jaxtrain import`: a Hugging Face model directory as a new jaxtrain workdir whose step-0
checkpoint is that model (the reading itself is jaxtrain/huggingface/importer.py).

    plan = plan_import(HF_DIR, WORKDIR, CONFIG, overrides)   # every check; nothing written
    (join the process group)
    result = run_import(plan)                                 # the workdir, step 0, its val_loss

The config's model section is replaced by the directory's architecture and
`train.init_from.huggingface` names the directory; everything else (data, parametrization,
optimizer, schedule) comes from CONFIG (default: jaxtrain's defaults). The run is
`train.run(stop_after=0)`: it checkpoints step 0 and evaluates it.

The workdir must be new (absent or empty), with one exception: an import killed before it
finished (SIGKILL, a lost node) leaves a workdir that is neither new nor a run (no
config.yaml yet, `eval` cannot read it). So import claims the workdir before writing
anything into it (`.jaxtrain-import.HOST.PID`, jaxtrain/staging.py) and removes the claim
once step 0 is saved and evaluated. A rerun that finds a claim whose importer is dead
(this host, its process gone) and no checkpoint past step 0 removes the workdir and starts
over; a live importer's claim, a workdir trained past step 0, and any workdir without a
claim (someone's run) are refused, and left as they are. An import that fails with an
error removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from jaxtrain import staging
from jaxtrain.config import Config
from jaxtrain.config_file import apply_overrides, from_dict, load_config
from jaxtrain.errors import UserError
from jaxtrain.huggingface.importer import HfModel, check_vocabulary, open_model
from jaxtrain.train import RunResult, run

MARKER = ".jaxtrain-import"


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    """A checked import: the source, the run's config and where it goes."""

    model: HfModel
    cfg: Config
    workdir: Path
    existed: bool  # the workdir existed (empty, or a dead import's) before this import
    leftover: bool  # the workdir is a dead import's, removed before starting over


def check_workdir(workdir: Path) -> bool:
    """Refuse a workdir import must not write; True when it is a dead import's leftover
    (to start over), False when it is new (absent or empty)."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: exists and is not a directory")
    if not workdir.exists() or not any(workdir.iterdir()):
        return False
    writers = staging.claims(workdir, MARKER)
    if not writers:
        raise UserError(f"--workdir {workdir}: already exists and is not empty (import makes a new workdir)")
    alive = [writer for writer in writers if staging.writer_alive(writer)]
    if alive:
        raise UserError(f"--workdir {workdir}: an import is writing it (process {alive[0]}, as HOST.PID); "
                        f"wait for it, or remove {workdir} once it has stopped")
    trained = [step for step in _checkpoint_steps(workdir) if step > 0]
    if trained:
        raise UserError(f"--workdir {workdir}: an unfinished import's, but it holds checkpoint step {max(trained)} "
                        f"(trained since); remove {workdir / (MARKER + '.' + writers[0])} to keep it as a run")
    return True


def _checkpoint_steps(workdir: Path) -> list[int]:
    """The steps of the checkpoint directories in `workdir` (orbax names them by step)."""
    checkpoints = workdir / "checkpoints"
    return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []


def import_config(model: HfModel, config: str | None, overrides: list[str]) -> Config:
    """CONFIG (or the defaults) with `--set` applied, the model section the directory's."""
    base = load_config(config, overrides) if config else from_dict(apply_overrides({}, overrides))
    raw = base.to_dict()
    raw["model"].update(model.fields)
    raw["train"]["init_from"] = {"huggingface": str(model.directory.absolute())}
    return from_dict(raw)


def plan_import(hf_dir: str | Path, workdir: str | Path, config: str | None, overrides: list[str]) -> ImportPlan:
    """Every check that needs no device: the workdir, the model directory, the config and
    the vocabulary (before run() would blame model.vocab_size, which comes from HF_DIR)."""
    workdir = Path(workdir)
    leftover = check_workdir(workdir)
    model = open_model(hf_dir)
    cfg = import_config(model, config, overrides)
    check_vocabulary(cfg, model)
    return ImportPlan(model, cfg, workdir, existed=workdir.exists(), leftover=leftover)


def run_import(plan: ImportPlan) -> RunResult:
    """Claim the workdir (process 0), checkpoint and evaluate step 0, release the claim."""
    lead = jax.process_index() == 0
    claim = _claim(plan) if lead else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxtrain import: workdir claimed")
    try:
        result = run(plan.cfg, plan.workdir, stop_after=0)
    except BaseException:
        if lead:
            shutil.rmtree(plan.workdir, ignore_errors=True)
            if plan.existed:
                plan.workdir.mkdir(exist_ok=True)
        raise
    if claim is not None:
        staging.release(claim)
    return result


def _claim(plan: ImportPlan) -> Path:
    if plan.leftover:
        shutil.rmtree(plan.workdir)
    try:
        plan.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--workdir {plan.workdir}: cannot create it ({err.strerror})") from None
    return staging.claim(plan.workdir, MARKER)
