"""Continued pretraining ("rewarm"): a new run that starts from another run's checkpoint,
or from a Hugging Face model directory (jaxtrain/huggingface/importer.py).

    train:
      init_from: {workdir: runs/base, step: 4000, optimizer: false}
      init_from: {huggingface: path/to/llama}   # config.json + safetensors; params only

When the new run's workdir has no checkpoint of its own, its initial state takes the
parameters of checkpoint `step` (default: the newest) of `workdir`, and with
`optimizer: true` also the Adam moments. Everything else starts fresh: step and tokens at
0, so the new run's own schedule applies from its start (a warmup back to the peak is the
"rewarm" of continued pretraining, Ibrahim et al. 2024, "Simple and Scalable Strategies to
Continually Pre-train Large Language Models"); the data section may name other data
(switch data, or mix in replay); the RNG comes from train.seed. The parent is only read.

The model and parametrization must be the parent's (the parameters have to fit); a
difference is one error line naming the key. Once the new run has checkpointed, it
resumes from its own checkpoints and `init_from` is not read again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.resume import INIT_FROM_SECTIONS, identity_difference
from jaxtrain.config.schema import Config
from jaxtrain.huggingface import importer
from jaxtrain.model import parametrization
from jaxtrain.run.workdir import Layout, open_at_step

def check_parent(cfg: Config, parent: Config, parent_dir: Path, table: parametrization.Table) -> None:
    """The parent's model and parametrization (config.INIT_FROM_SECTIONS) must be this run's."""
    difference = identity_difference(cfg.to_dict(), parent.to_dict(), sections=INIT_FROM_SECTIONS)
    if difference:
        key, theirs, mine = difference
        raise ConfigError(key, f"is {mine!r}, but train.init_from.workdir {parent_dir} was trained with {theirs!r}")
    saved_table = Layout(parent_dir).table
    if saved_table.is_file():
        parametrization.check_matches(json.loads(saved_table.read_text()), table)


def check_before_start(cfg: Config, table: parametrization.Table, workdir: Path) -> None:
    """The source is checked before the workdir is created: a Hugging Face model's files and
    fit, or the parent run's config, its checkpoint `step` and its model. Nothing to check
    once the workdir has checkpoints of its own (init_from is not read again)."""
    source = cfg.train.init_from
    if source is None or Layout(workdir).has_checkpoints():
        return
    if source.huggingface is not None:
        importer.check_source(cfg, table, source.huggingface)
        return
    with _parent_at_step(source.workdir, source.step) as parent:
        check_parent(cfg, parent.cfg, parent.workdir, table)


def _parent_at_step(workdir: str, step: int | None):
    """The parent run opened at its checkpoint `step` (a refusal names the config keys)."""
    if not Path(workdir).is_dir():
        raise ConfigError("train.init_from.workdir", f"{workdir}: no such directory")
    return open_at_step(workdir, step, step_name="train.init_from.step")


def initial_state(cfg: Config, table: parametrization.Table, fresh: Any, abstract: Any,
                  message: Callable[[str], None]) -> Any:
    """`fresh` (a newly initialized TrainState) with the parent's params, and optimizer
    state if asked; `abstract` is the restore target (ShapeDtypeStructs with shardings)."""
    source = cfg.train.init_from
    if source.huggingface is not None:
        params = importer.imported_params(cfg, table, fresh.params, source.huggingface)
        message(f"initialized from the Hugging Face model {Path(source.huggingface).absolute()} (params); "
                f"step and tokens start at 0")
        return fresh.replace(params=importer.place(params, abstract.params))
    with _parent_at_step(source.workdir, source.step) as parent:
        check_parent(cfg, parent.cfg, parent.workdir, table)
        ckpt, step, parent_dir = parent.checkpointer, parent.step, parent.workdir
        if source.optimizer:
            try:
                state, _, _ = ckpt.restore(step, abstract)
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"train.init_from.optimizer: the optimizer state of {parent_dir} step {step} "
                                f"does not fit this run's optimizer ({str(err).splitlines()[0][:200]})") from None
            fresh = fresh.replace(params=state.params, opt_state=state.opt_state)
        else:
            fresh = fresh.replace(params=ckpt.restore_params(step, abstract.params))
    loaded = "params and optimizer state" if source.optimizer else "params"
    message(f"initialized from {parent_dir} checkpoint at step {step} ({loaded}); step and tokens start at 0")
    return fresh
