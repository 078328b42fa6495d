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
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml

from jaxtrain import rewarm, sharding, telemetry
from jaxtrain import train_step as ts
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.config import Config
from jaxtrain.parametrization import Table
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource, open_sources
from jaxtrain.evaluate import Evaluator
from jaxtrain.metrics import MetricsLogger
from jaxtrain.nonfinite import NonFiniteGuard
from jaxtrain.preemption import StopRequest, StopVote, stop_on_signal
from jaxtrain.preflight import check_resumable, preflight_training
from jaxtrain.schedules import make_schedule


@dataclasses.dataclass
class RunResult:
    step: int
    tokens: int
    val_loss: float  # of the newest evaluation, at val_step
    val_bits_per_byte: float
    val_step: int  # == step unless the run stopped between evaluations
    unigram_entropy: float  # nats/token of the training data (weighted over sources)
    resumed_from: int | None
    stop_signal: int | None  # set when a signal stopped the run early


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


def run(cfg: Config, workdir: str | Path, *, stop_after: int | None = None, console: bool = True,
        check_memory: bool = True) -> RunResult:
    """Train in `workdir`, resuming from its newest checkpoint. `stop_after` ends this
    invocation after that step (with a checkpoint), as a preemption would. `console=False`
    keeps the terminal quiet (metrics.jsonl and TensorBoard are still written).
    `check_memory=False` skips the memory preflight (`memory.check_fits`)."""
    workdir = Path(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    sources = open_sources(cfg)
    spec = preflight_training(cfg, mesh, sources, workdir, check_memory=check_memory)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    try:
        check_resumable(workdir, cfg, spec.table, ckpt)
        parts = _build(cfg, spec, mesh, sources)
        with stop_on_signal(cfg.train.grace_period_sec) as stop:
            return TrainingRun(cfg, parts, ckpt, stop, stop_after).train(workdir, console)
    finally:
        ckpt.close()


@dataclasses.dataclass
class _Parts:
    """The compiled steps and data streams of one run."""

    spec: ts.ModelSpec
    steps: ts.Steps  # .train, .train_extra (with telemetry), .init, .evaluate
    diagnose: Callable | None  # every diagnostics.every_steps steps
    evaluate: Evaluator
    iterator: Any  # grain DatasetIterator, checkpointable
    to_global: Callable  # process-local numpy batch -> global jax.Array
    sources: list[DataSource]


def _build(cfg: Config, spec: ts.ModelSpec, mesh, sources: list[DataSource]) -> _Parts:
    watch = telemetry.step_metrics(spec) if cfg.diagnostics.telemetry_every > 0 else None
    steps = ts.build_steps(cfg, spec, mesh, extra_metrics=watch)
    rows, row_blocks = sharding.process_rows(mesh, cfg.train.batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    to_global = lambda local: jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
    iterator = pipeline.TrainBatches(cfg, sources, rows, row_blocks, warn=_warn)
    diagnose = telemetry.compile_diagnose(cfg, spec, steps.shardings, mesh)
    evaluator = Evaluator(steps.evaluate, cfg, sources, mesh)
    return _Parts(spec, steps, diagnose, evaluator, iterator, to_global, sources)


class TrainingRun:
    """One invocation of training on a workdir: the config, compiled parts, checkpointer,
    non-finite guard and stop vote, and the state they advance (params and optimizer state,
    step, tokens seen, the newest evaluation and its step)."""

    def __init__(self, cfg: Config, parts: _Parts, ckpt: Checkpointer, stop: StopRequest,
                 stop_after: int | None = None):
        self.cfg, self.parts, self.ckpt, self.stop, self.stop_after = cfg, parts, ckpt, stop, stop_after
        self.vote, self.stopped_by = StopVote(), None
        self.val, self.val_step = None, None
        self.notes: list[str] = []
        self.state, counters, self.resumed_from = self._init_or_restore()
        self.step, self.tokens = int(jax.device_get(self.state.step)), counters["tokens"]
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, ckpt.latest_step, counters["skipped_steps"])
        # stored in every checkpoint's meta; dumped once, not per step
        self._run_meta = {"config": cfg.to_dict(), "parametrization": parts.spec.table.to_json()}

    def _init_or_restore(self) -> tuple[ts.TrainState, dict, int | None]:
        """(state, counters, step resumed from or None) from the newest readable checkpoint
        (unreadable newer ones are reported and skipped); restoring also rewinds the iterator.
        counters: tokens seen and steps skipped as non-finite. A new run with train.init_from
        starts from that run's checkpoint (jaxtrain/rewarm.py); what it loaded goes to notes."""
        cfg, parts = self.cfg, self.parts
        target = ts.abstract_state(cfg, parts.spec, parts.steps.tx, parts.steps.shardings)
        newest = self.ckpt.restore_newest(target, warn=_warn)
        if newest is None:
            state = parts.steps.init()
            if cfg.train.init_from is not None:
                state = rewarm.initial_state(cfg, parts.spec.table, state, target, self.notes.append)
            return state, {"tokens": 0, "skipped_steps": 0}, None
        resumed_from, state, data_state, meta = newest
        parts.iterator.set_state(data_state)
        return state, {"tokens": int(meta["tokens"]), "skipped_steps": int(meta.get("skipped_steps", 0))}, resumed_from

    def train(self, workdir: Path, console: bool) -> RunResult:
        """Record the run, train to train.steps (or a stop), and report."""
        cfg = self.cfg
        self.logger = MetricsLogger(workdir, self.step, cfg.train.steps, enabled=jax.process_index() == 0,
                                    console=console, wandb_project=cfg.train.wandb_project,
                                    run_config=cfg.to_dict(), warn=_warn)
        try:
            record_run(workdir, cfg, self.parts.spec.table)  # every resume check has passed
            if self.resumed_from is not None:
                self.logger.message(f"resumed from checkpoint at step {self.resumed_from} ({self.tokens:,} tokens)")
            for note in self.notes:
                self.logger.message(note)
            self._loop()
            self.ckpt.wait()
            if self.val is None:  # nothing evaluated in this invocation: evaluate where it ended
                self._evaluate()
        finally:
            self.logger.close()
        sources = self.parts.sources
        entropy = sum(s.weight * s.unigram_entropy for s in sources) / sum(s.weight for s in sources)
        return RunResult(self.step, self.tokens, self.val["val_loss"], self.val["val_bits_per_byte"],
                         self.val_step, entropy, self.resumed_from, self.stopped_by)

    def _evaluate(self) -> None:
        self.val, self.val_step = self.parts.evaluate(self.state.params), self.step

    def _save(self) -> bool:
        """Checkpoint the current step; the iterator's state is read only here."""
        meta = {"tokens": self.tokens, "step": self.step, "skipped_steps": self.guard.skipped, **self._run_meta}
        return self.ckpt.save(self.step, self.state, self.parts.iterator.get_state(), meta, force=True)

    def _loop(self) -> None:
        cfg, parts, guard, logger = self.cfg, self.parts, self.guard, self.logger
        if self.stop_after is not None and self.step >= self.stop_after:  # nothing to train: checkpoint as is
            if self.step not in self.ckpt.all_steps():
                self._save()
            return
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        throughput, pending = _Throughput(self.tokens), None
        schedule = make_schedule(cfg, self.step, self.tokens)  # the budget counts the tokens already seen
        telemetry_every = cfg.diagnostics.telemetry_every

        def write(row_parts) -> None:
            logger.write({**_row(*row_parts, throughput, cfg), **guard.row_fields()})

        while self.step < cfg.train.steps:
            batch = parts.to_global(next(parts.iterator))
            telemetry_now = telemetry_every > 0 and (self.step + 1) % telemetry_every == 0
            lr = np.float32(schedule(self.tokens))
            step_fn = parts.steps.train_extra if telemetry_now else parts.steps.train
            self.state, metrics = step_fn(self.state, batch, lr)
            self.step, self.tokens = self.step + 1, self.tokens + tokens_per_step
            step = self.step
            metrics = guard.record(step, metrics)
            if pending is not None:  # step N-1's metrics, fetched after step N was dispatched
                guard.check(upto=step - 1)
                write(pending)
                pending = None
            last = step == cfg.train.steps
            evaluate_now = step % cfg.train.eval_every == 0 or last
            if evaluate_now:
                jax.block_until_ready(metrics)  # the pause starts once the queued steps are done
                started = time.perf_counter()
                self._evaluate()
                throughput.paused += time.perf_counter() - started
            diagnose_now = parts.diagnose is not None and step % cfg.diagnostics.every_steps == 0
            if diagnose_now:
                jax.block_until_ready(metrics)
                started = time.perf_counter()
                metrics = {**metrics, **jax.block_until_ready(parts.diagnose(self.state.params, batch, step))}
                throughput.paused += time.perf_counter() - started
            if evaluate_now or diagnose_now or telemetry_now or step % cfg.train.log_every == 0:
                pending = (step, self.tokens, metrics, self.val if evaluate_now else None)
            self.stopped_by = self.vote(self.stop)  # the same answer on every process after the same step
            halt = self.stopped_by is not None or step == self.stop_after
            saved = False
            if last or halt or self.ckpt.due(step):
                guard.check()  # never checkpoint a state from a non-finite step
                if pending is not None:  # a checkpointed step's row is on disk before its
                    write(pending)  # checkpoint, so a kill never loses it
                    pending = None
                saved = self._save()
            if halt:
                logger.message(f"stopping: checkpoint {'saved' if saved else 'exists'} at step {step}")
                break
        if pending is not None:
            guard.check()
            write(pending)


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
