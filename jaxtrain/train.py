"""The training loop: build everything from the config, resume if the workdir has a
checkpoint, then feed grain batches to the compiled step until `train.steps`.

Data flow:  config -> mesh -> model spec -> shardings -> jit(init) or orbax restore
            -> [grain batch -> global array -> train_step] x steps, checkpoints, logs.

The loop never waits on the device except to log: step N's metrics are fetched after
step N+1 has been dispatched. Evaluation runs every `train.eval_every` steps.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml

from jaxtrain import memory, parametrization, rewarm, sharding, telemetry
from jaxtrain import train_step as ts
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.config import Config, identity_difference
from jaxtrain.config_file import read_yaml_mapping
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource, open_sources
from jaxtrain.errors import ConfigError, UserError
from jaxtrain.evaluate import Evaluator
from jaxtrain.metrics import MetricsLogger, check_wandb
from jaxtrain.model import check_compute
from jaxtrain.nonfinite import NonFiniteGuard
from jaxtrain.parametrization import Table
from jaxtrain.preemption import StopRequest, StopVote, stop_on_signal
from jaxtrain.schedules import make_schedule

@dataclasses.dataclass
class RunResult:
    step: int
    tokens: int
    val_loss: float | None
    val_bits_per_byte: float | None
    unigram_entropy: float  # nats/token of the training data (weighted over sources)
    resumed_from: int | None
    stop_signal: int | None  # set when a signal stopped the run early


def check_workdir(workdir: Path, cfg: Config, table: Table, ckpt: Checkpointer) -> None:
    """Refuse to resume a run whose model, data or parametrization table differ (before
    anything is written; `record_run` writes once every check has passed)."""
    meta = ckpt.newest_meta()
    path = workdir / "config.yaml"
    if meta is not None and path.exists():
        difference = identity_difference(cfg.to_dict(), read_yaml_mapping(path, "the run's config"))
        if difference:
            key, old, value = difference
            raise ConfigError(key, f"workdir {workdir} holds a run with {old!r}, "
                                   f"this config says {value!r}; use a new --workdir")
    if meta is not None:
        saved_table = meta.get("parametrization")
        if saved_table is not None:
            parametrization.check_matches(saved_table, table)


def record_run(workdir: Path, cfg: Config, table: Table) -> None:
    """The resolved config and table in the workdir, each replaced atomically."""
    if jax.process_index() == 0:
        _write_atomic(workdir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_atomic(workdir / "parametrization.json", json.dumps(table.to_json(), indent=1))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxtrain: warning: {text}", file=sys.stderr, flush=True)


class _Throughput:
    """tokens/s between logged rows, excluding evaluation pauses; ETA from the same rate."""

    def __init__(self, tokens: int):
        self.tokens, self.time, self.paused = tokens, time.perf_counter(), 0.0

    def measure(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time - self.paused, 1e-9)
        self.tokens, self.time, self.paused = tokens, now, 0.0
        return rate


def check_writable(workdir: Path) -> None:
    """One line, before anything is compiled, if this process could not write the run: the
    workdir and its checkpoints if they exist, else the nearest directory above that does
    (probed by creating a file: permission bits alone do not say what root, ACLs or a
    read-only mount allow)."""
    existing = [d for d in (workdir / "checkpoints", workdir) if d.is_dir()]
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


def run(cfg: Config, workdir: str | Path, *, stop_after: int | None = None, console: bool = True,
        check_memory: bool = True) -> RunResult:
    """Train in `workdir`, resuming from its newest checkpoint. `stop_after` ends this
    invocation after that step (with a checkpoint), as a preemption would. `console=False`
    keeps the terminal quiet (metrics.jsonl and TensorBoard are still written).
    `check_memory=False` skips the memory preflight (`memory.check_fits`)."""
    workdir = Path(workdir)
    check_compute(cfg.model)
    check_wandb(cfg.train.wandb_project)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_divides(cfg, mesh)
    sources = open_sources(cfg)
    pipeline.check_fits(cfg, sources)
    check_writable(workdir)
    spec = ts.model_spec(cfg)
    if check_memory:
        memory.check_fits(cfg, spec, mesh)
    rewarm.check_before_start(cfg, spec.table, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    try:
        check_workdir(workdir, cfg, spec.table, ckpt)
        with stop_on_signal(cfg.train.grace_period_sec) as stop:
            return _train(cfg, spec, workdir, mesh, sources, ckpt, stop, stop_after, console)
    finally:
        ckpt.close()


@dataclasses.dataclass
class _Parts:
    """The compiled steps and data streams of one run."""

    spec: ts.ModelSpec
    tx: Any
    shardings: ts.TrainState
    train_step: Callable
    train_telemetry: Callable | None  # the step with stability telemetry, every diagnostics.telemetry_every steps
    diagnose: Callable | None  # every diagnostics.every_steps steps
    evaluate: Evaluator
    iterator: Any  # grain DatasetIterator, checkpointable
    to_global: Callable  # process-local numpy batch -> global jax.Array


def _build(cfg: Config, spec: ts.ModelSpec, mesh, sources: list[DataSource]) -> _Parts:
    watch = telemetry.step_metrics(spec) if cfg.diagnostics.telemetry_every > 0 else None
    steps = ts.build_steps(cfg, spec, mesh, extra_metrics=watch)
    tx, shardings = steps.tx, steps.shardings
    rows, row_blocks = sharding.process_rows(mesh, cfg.train.batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    to_global = lambda local: jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
    iterator = pipeline.train_iterator(cfg, sources, rows, row_blocks, warn=_warn)
    diagnose = telemetry.compile_diagnose(cfg, spec, shardings, mesh)
    evaluator = Evaluator(steps.evaluate, cfg, sources, mesh)
    return _Parts(spec, tx, shardings, steps.train, steps.train_extra, diagnose, evaluator, iterator, to_global)


def _init_or_restore(cfg: Config, parts: _Parts, ckpt: Checkpointer,
                     notes: list[str]) -> tuple[ts.TrainState, dict, int | None]:
    """(state, counters, step resumed from or None) from the newest readable checkpoint
    (unreadable newer ones are reported and skipped); restoring also rewinds the iterator.
    counters: tokens seen and steps skipped as non-finite. A new run with train.init_from
    starts from that run's checkpoint (jaxtrain/rewarm.py); what it loaded goes to `notes`."""
    target = ts.abstract_state(cfg, parts.spec, parts.tx, parts.shardings)
    newest = ckpt.restore_newest(target, warn=_warn)
    if newest is None:
        state = ts.init_state(cfg, parts.spec, parts.tx, parts.shardings)
        if cfg.train.init_from is not None:
            state = rewarm.initial_state(cfg, parts.spec.table, state, target, notes.append)
        return state, {"tokens": 0, "skipped_steps": 0}, None
    resumed_from, state, data_state, meta = newest
    parts.iterator.set_state(data_state)
    return state, {"tokens": int(meta["tokens"]), "skipped_steps": int(meta.get("skipped_steps", 0))}, resumed_from


def _train(cfg: Config, spec: ts.ModelSpec, workdir: Path, mesh, sources: list[DataSource], ckpt: Checkpointer,
           stop: StopRequest, stop_after: int | None, console: bool) -> RunResult:
    parts = _build(cfg, spec, mesh, sources)
    notes: list[str] = []
    state, counters, resumed_from = _init_or_restore(cfg, parts, ckpt, notes)
    step, tokens = int(jax.device_get(state.step)), counters["tokens"]
    guard = NonFiniteGuard(cfg.train.on_nonfinite, ckpt.latest_step, counters["skipped_steps"])
    logger = MetricsLogger(workdir, step, cfg.train.steps, enabled=jax.process_index() == 0, console=console,
                           wandb_project=cfg.train.wandb_project, run_config=cfg.to_dict(), warn=_warn)
    try:
        record_run(workdir, cfg, spec.table)  # every resume check has passed: the state is restored
        if resumed_from is not None:
            logger.message(f"resumed from checkpoint at step {resumed_from} ({tokens:,} tokens)")
        for note in notes:
            logger.message(note)
        state, step, tokens, val, stopped_by = _loop(cfg, parts, ckpt, logger, stop, stop_after, guard,
                                                     state, step, tokens)
        ckpt.wait()
        if val is None:  # resumed a finished run: report its quality anyway
            val = parts.evaluate(state.params)
    finally:
        logger.close()
    entropy = sum(s.weight * s.unigram_entropy for s in sources) / sum(s.weight for s in sources)
    return RunResult(step, tokens, val["val_loss"], val["val_bits_per_byte"], entropy, resumed_from, stopped_by)


def _loop(cfg: Config, parts: _Parts, ckpt: Checkpointer, logger: MetricsLogger, stop: StopRequest,
          stop_after: int | None, guard: NonFiniteGuard, state: ts.TrainState, step: int, tokens: int):
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    # stored in every checkpoint's meta; dumped once, not per step
    run_meta = {"config": cfg.to_dict(), "parametrization": parts.spec.table.to_json()}
    throughput, pending, val = _Throughput(tokens), None, None
    schedule = make_schedule(cfg, step, tokens)  # the budget counts the tokens already seen
    vote, stopped_by = StopVote(), None
    telemetry_every = cfg.diagnostics.telemetry_every
    if stop_after is not None and step >= stop_after:  # nothing to train now: checkpoint the state as it is
        meta = {"tokens": tokens, "step": step, "skipped_steps": guard.skipped, **run_meta}
        if step not in ckpt.all_steps():
            ckpt.save(step, state, parts.iterator.get_state(), meta, force=True)
        return state, step, tokens, None, None
    while step < cfg.train.steps:
        batch = parts.to_global(next(parts.iterator))
        telemetry_now = telemetry_every > 0 and (step + 1) % telemetry_every == 0
        lr = np.float32(schedule(tokens))
        state, metrics = (parts.train_telemetry if telemetry_now else parts.train_step)(state, batch, lr)
        step, tokens = step + 1, tokens + tokens_per_step
        metrics = guard.record(step, metrics)
        if pending is not None:  # step N-1's metrics, fetched after step N was dispatched
            guard.check(upto=step - 1)
            logger.write({**_row(*pending, throughput, cfg), **guard.row_fields()})
            pending = None
        last = step == cfg.train.steps
        evaluate_now = step % cfg.train.eval_every == 0 or last
        if evaluate_now:
            jax.block_until_ready(metrics)  # the pause starts once the queued steps are done
            started = time.perf_counter()
            val = parts.evaluate(state.params)
            throughput.paused += time.perf_counter() - started
        diagnose_now = parts.diagnose is not None and step % cfg.diagnostics.every_steps == 0
        if diagnose_now:
            jax.block_until_ready(metrics)
            started = time.perf_counter()
            metrics = {**metrics, **jax.block_until_ready(parts.diagnose(state.params, batch, step))}
            throughput.paused += time.perf_counter() - started
        if evaluate_now or diagnose_now or telemetry_now or step % cfg.train.log_every == 0:
            pending = (step, tokens, metrics, val if evaluate_now else None)
        stopped_by = vote(stop)  # the same answer on every process after the same step
        halt = stopped_by is not None or step == stop_after
        saved = False
        if last or halt or ckpt.due(step):  # the iterator's state is read only for a checkpoint
            guard.check()  # never checkpoint a state from a non-finite step
            if pending is not None:  # a checkpointed step's row is on disk before its checkpoint, so a
                logger.write({**_row(*pending, throughput, cfg), **guard.row_fields()})  # kill never loses it
                pending = None
            meta = {"tokens": tokens, "step": step, "skipped_steps": guard.skipped, **run_meta}
            saved = ckpt.save(step, state, parts.iterator.get_state(), meta, force=True)
        if halt:
            logger.message(f"stopping: checkpoint {'saved' if saved else 'exists'} at step {step}")
            break
    if pending is not None:
        guard.check()
        logger.write({**_row(*pending, throughput, cfg), **guard.row_fields()})
    return state, step, tokens, val, stopped_by


def _row(step: int, tokens: int, metrics: dict, val: dict | None, throughput: _Throughput,
         cfg: Config) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    rate = throughput.measure(tokens)
    remaining = (cfg.train.steps - step) * cfg.train.batch_size * cfg.data.seq_len
    row = {"step": step, "tokens": tokens, **values, "tokens_per_sec": rate,
           "eta_sec": remaining / rate if rate > 0 else None}
    if val is not None:
        row.update(val)
    return row
