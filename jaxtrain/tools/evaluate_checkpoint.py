"""`jaxtrain eval`: the validation metrics of any saved checkpoint, on the run's own data or
on other prepared datasets / text files, computed by the same Evaluator the training loop
calls, so `jaxtrain eval WORKDIR --step N` reproduces the `val_loss` logged at step N; and
(`evaluate_tasks`) the config's evaluation tasks or any text's bits per byte, scored by the
same Tasks the loop calls (jaxtrain/run/tasks.py), so `--tasks` reproduces its
eval/<task>/<metric> values at step N."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from jaxtrain import step as ts
from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.data.sources import open_sources
from jaxtrain.run.evaluate import Evaluator
from jaxtrain.run.preflight import preflight
from jaxtrain.run.tasks import Tasks
from jaxtrain.tools.saved_run import SavedRun


def evaluate_run(run: SavedRun, data_paths: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Validation metrics of a saved checkpoint, on the run's own data or on `data_paths`
    (prepared dataset directories, or text files/globs split into train/validation by the
    same rule as `data.paths`)."""
    cfg = run.cfg
    if data_paths:
        cfg = cfg.model_copy(update={"data": _other_data(cfg, data_paths)})
    evaluate = ts.compile_eval(run.spec, run.mesh)  # the loop's evaluation, on the loading mesh
    try:
        sources = open_sources(cfg)
    except UserError as err:  # the paths came from --data, not from the config's data section
        if not data_paths:
            raise
        raise UserError(f"--data {' '.join(data_paths)}: {str(err).split(': ', 1)[-1]}") from None
    preflight(cfg, run.mesh, sources, splits=("validation",))  # refused here as train would refuse it
    evaluator = Evaluator(evaluate, cfg, sources, run.mesh)
    result = evaluator(run.params)
    loss = result["val_loss"]
    tokens = evaluator.predicted_tokens()
    return {**dataclasses.asdict(EvalReport(
        step=run.step, tokens_seen=run.tokens, val_loss=loss, perplexity=math.exp(loss),
        bits_per_byte=result["val_bits_per_byte"], val_tokens=tokens,
        data=[s.path for s in cfg.data.sources] or list(cfg.data.paths))),
        **{k: v for k, v in result.items() if k.startswith("val_loss/")}}


def evaluate_tasks(run: SavedRun, names: list[str] | None = None, text: tuple[str, ...] = ()) -> dict[str, Any]:
    """eval/<task>/<metric> of a saved checkpoint: the config's eval.tasks (`names`: those;
    None: all; []: none) and, with `text`, the bits per byte of those files as task "text"
    (any number of documents: the last scoring call's batch is padded)."""
    if names == [] and not text:
        raise UserError("nothing to evaluate: give --tasks, or --text FILE")
    if names is None and not run.cfg.eval.tasks:
        raise UserError(f"{run.workdir}: its config has no eval.tasks (give --text FILE to score text)")
    tasks = Tasks.for_config(run.cfg, run.spec, run.mesh, names, text)
    return {"step": run.step, "tokens_seen": run.tokens, **tasks(run.params)}


def _other_data(cfg: Config, data_paths: tuple[str, ...]):
    if all((Path(p).expanduser() / "metadata.json").exists() for p in data_paths):
        sources = tuple({"path": p} for p in data_paths)
        return cfg.data.model_validate({**cfg.data.model_dump(), "sources": sources, "phases": ()})
    return cfg.data.model_copy(update={"paths": tuple(data_paths), "sources": (), "phases": ()})


@dataclasses.dataclass(frozen=True)
class EvalReport:
    step: int
    tokens_seen: int  # training tokens of the checkpoint
    val_loss: float  # nats/token
    perplexity: float
    bits_per_byte: float
    val_tokens: int  # predicted tokens the figures average over
    data: list[str]
