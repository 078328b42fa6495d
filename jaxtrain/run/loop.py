"""The training loop: build everything from the config, resume if the workdir has a
checkpoint, then feed grain batches to the compiled step until `train.steps`.

Data flow:  config -> mesh -> model spec -> shardings -> jit(init) or orbax restore
            -> [grain batch -> global array -> train_step] x steps, checkpoints, logs.

The loop dispatches a step, then runs the periodic actions due after it
(jaxtrain/run/periodic.py), each registered with its period in `TrainingRun._actions`, in
the order they run: write the previous row, evaluate, diagnose, hold this step's row,
stop vote, checkpoint. It never waits on the device except to log: step N's metrics are
fetched after step N+1 has been dispatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from jaxtrain import step as ts
from jaxtrain.config.errors import WriteError
from jaxtrain.config.schema import Config
from jaxtrain.data import pipeline
from jaxtrain.data.sources import DataSource, open_sources
from jaxtrain.model import sharding
from jaxtrain.optim.schedules import make_schedule
from jaxtrain.run import periodic, rewarm, telemetry
from jaxtrain.run.tasks import Tasks, every as tasks_every
from jaxtrain.run.checkpoint import Checkpointer, CheckpointSaveError
from jaxtrain.run.evaluate import Evaluator
from jaxtrain.run.metrics import MetricsLogger
from jaxtrain.run.nonfinite import NonFiniteGuard
from jaxtrain.run.preemption import StopRequest, StopVote, stop_on_signal
from jaxtrain.run.preflight import check_resumable, preflight_training
from jaxtrain.run.workdir import Layout, owned, record_run


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


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxtrain: warning: {text}", file=sys.stderr, flush=True)


def run(cfg: Config, workdir: str | Path, *, stop_after: int | None = None, console: bool = True,
        check_memory: bool = True, command: str = "train") -> RunResult:
    """Train in `workdir`, resuming from its newest checkpoint. `stop_after` ends this
    invocation after that step (with a checkpoint), as a preemption would. `console=False`
    keeps the terminal quiet (metrics.jsonl and TensorBoard are still written).
    `check_memory=False` skips the memory preflight (`memory.check_fits`). The workdir is
    owned (`workdir.owned`, in `command`'s name) from after the preflight to the end."""
    workdir = Path(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    sources = open_sources(cfg)
    spec = preflight_training(cfg, mesh, sources, workdir, check_memory=check_memory)
    with owned(workdir, command):
        ckpt = Checkpointer(Layout(workdir).checkpoints, cfg.checkpoint)
        try:
            check_resumable(workdir, cfg, spec.table, ckpt)
            parts = _build(cfg, spec, mesh, sources)
            with stop_on_signal(cfg.train.grace_period_sec) as stop:
                return _train(cfg, parts, ckpt, stop, stop_after, workdir, console)
        except WriteError as err:  # a log or record failed to write: say what the run can resume from
            if isinstance(err, CheckpointSaveError):
                raise
            raise err.with_intact(ckpt.settle()) from None
        finally:
            ckpt.close()



@dataclasses.dataclass
class _Parts:
    """The compiled steps and data streams of one run."""

    spec: ts.ModelSpec
    steps: ts.Steps  # jitted .train, .train_extra (with telemetry), .evaluate (one batch's loss); .init
    diagnose: Callable | None  # jitted; every diagnostics.every_steps steps
    evaluator: Evaluator  # the validation set through steps.evaluate: val_loss, val_bits_per_byte
    tasks: Tasks | None  # eval.tasks, read and tokenized once (None without any)
    iterator: Any  # grain DatasetIterator, checkpointable
    to_global: Callable  # process-local numpy batch -> global jax.Array
    sources: list[DataSource]


def _build(cfg: Config, spec: ts.ModelSpec, mesh, sources: list[DataSource]) -> _Parts:
    watch = None
    if cfg.diagnostics.telemetry_every > 0:
        scale = telemetry.sigma_reference(cfg, spec.table)
        watch = telemetry.step_metrics(spec, scale, cfg.diagnostics.power_iterations)
    steps = ts.build_steps(cfg, spec, mesh, extra_metrics=watch)
    rows, row_blocks = sharding.process_rows(mesh, cfg.train.batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    to_global = lambda local: jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
    iterator = pipeline.TrainBatches(cfg, sources, rows, row_blocks, warn=_warn)
    diagnose = telemetry.compile_diagnose(cfg, spec, steps.shardings, mesh)
    evaluator = Evaluator(steps.evaluate, cfg, sources, mesh)
    tasks = Tasks.for_config(cfg, spec, mesh) if cfg.eval.tasks else None
    return _Parts(spec, steps, diagnose, evaluator, tasks, iterator, to_global, sources)


@dataclasses.dataclass
class _Start:
    """Where this invocation starts: the newest readable checkpoint, or a new state."""

    state: ts.TrainState
    step: int
    tokens: int  # seen before this invocation
    skipped_steps: int  # skipped as non-finite before this invocation
    resumed_from: int | None  # the checkpoint's step; None for a new run
    notes: list[str]  # what train.init_from loaded, for the log


def _restore_or_init(cfg: Config, parts: _Parts, ckpt: Checkpointer) -> _Start:
    """Restore the newest readable checkpoint (unreadable newer ones are reported and
    skipped), rewinding the data iterator to it; without one, initialize. A new run with
    train.init_from starts from that run's or model's weights (jaxtrain/run/rewarm.py)."""
    target = parts.steps.abstract_state()
    newest, notes = ckpt.restore_newest(target, warn=_warn), []
    if newest is None:
        state, resumed_from, meta = parts.steps.init(), None, {"tokens": 0}
        if cfg.train.init_from is not None:
            state = rewarm.initial_state(cfg, parts.spec.table, state, target, notes.append)
    else:
        resumed_from, state, data_state, meta = newest
        parts.iterator.set_state(data_state)
    return _Start(state, int(jax.device_get(state.step)), int(meta["tokens"]), int(meta.get("skipped_steps", 0)),
                  resumed_from, notes)


def _train(cfg: Config, parts: _Parts, ckpt: Checkpointer, stop: StopRequest, stop_after: int | None,
           workdir: Path, console: bool) -> RunResult:
    """Restore (or initialize), open the logs at that step, record the run (every resume
    check has passed), train to train.steps or a stop, and report."""
    start = _restore_or_init(cfg, parts, ckpt)
    logger = MetricsLogger(workdir, start.step, cfg.train.steps, enabled=jax.process_index() == 0,
                           console=console, wandb_project=cfg.train.wandb_project,
                           run_config=cfg.to_dict(), warn=_warn, fresh=start.resumed_from is None)
    try:
        record_run(workdir, cfg, parts.spec.table)
        if start.resumed_from is not None:
            logger.message(f"resumed from checkpoint at step {start.resumed_from} ({start.tokens:,} tokens)")
        for note in start.notes:
            logger.message(note)
        return TrainingRun(cfg, parts, ckpt, start, logger, stop, stop_after).train()
    finally:
        logger.close()


class TrainingRun:
    """One invocation of training from its `_Start`: the state it advances (params and
    optimizer state, step, tokens seen, the newest evaluation and its step), and the
    periodic actions run after each step with what they use (metrics rows, checkpointer,
    non-finite guard, stop vote). Constructing one reads and writes nothing."""

    def __init__(self, cfg: Config, parts: _Parts, ckpt: Checkpointer, start: _Start, logger: MetricsLogger,
                 stop: StopRequest, stop_after: int | None = None):
        self.cfg, self.parts, self.ckpt, self.logger, self.stop, self.stop_after = (
            cfg, parts, ckpt, logger, stop, stop_after)
        self.state, self.step, self.tokens, self.resumed_from = start.state, start.step, start.tokens, start.resumed_from
        self.val, self.val_step, self.stopped_by = None, None, None
        self.scores: dict[str, float] = {}  # of the newest task evaluation
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, ckpt.latest_step, start.skipped_steps)
        self.vote = StopVote()
        self.rows = _Rows(cfg, logger, self.guard)
        self.schedule = make_schedule(cfg, start.step, start.tokens)  # the budget counts the tokens already seen
        # stored in every checkpoint's meta; dumped once, not per step
        self._run_meta = {"config": cfg.to_dict(), "parametrization": parts.spec.table.to_json()}

    def train(self) -> RunResult:
        """Train to train.steps (or a stop); report the newest evaluation (made at the end if
        this invocation made none)."""
        self._loop()
        self.ckpt.wait()
        if self.val is None:
            self._evaluate()
        sources = self.parts.sources
        entropy = sum(s.weight * s.unigram_entropy for s in sources) / sum(s.weight for s in sources)
        return RunResult(self.step, self.tokens, self.val["val_loss"], self.val["val_bits_per_byte"],
                         self.val_step, entropy, self.resumed_from, self.stopped_by)

    def _loop(self) -> None:
        """Dispatch steps to train.steps, running the actions due after each; stop after a
        step the stop vote or stop_after halts at."""
        if self.stop_after is not None and self.step >= self.stop_after:  # nothing to train: checkpoint as is
            if self.step not in self.ckpt.all_steps():
                self._save()
            return
        if self.step == 0 and self.resumed_from is None and self.parts.tasks is not None:
            self._evaluate_start()
        actions = self._actions()
        self.rows.start(self.tokens)
        while self.step < self.cfg.train.steps:
            tick = self._dispatch()
            periodic.run_due(actions, tick)
            if tick.halt:
                break
        self.rows.flush()  # the final step's row, unless its checkpoint wrote it

    def _actions(self) -> list[periodic.Action]:
        """The actions after each step with their periods, in the order they run."""
        cfg, Action = self.cfg, periodic.Action
        diagnose_every = cfg.diagnostics.every_steps if self.parts.diagnose is not None else 0
        return [
            # First: fetch and write the previous logged step's row, now that this step is
            # queued behind it (the loop's only wait on the device), so it is on disk and
            # timed before the slow actions below.
            Action("write previous row", self._write_previous_row, every=1),
            # Both read this step's params and pause the tokens/s clock.
            Action("evaluate", self._evaluate_paused, every=cfg.train.eval_every, also=lambda t: t.last),
            Action("tasks", self._score_tasks_paused, every=tasks_every(cfg),
                   also=lambda t: t.last and self.parts.tasks is not None),
            Action("diagnose", self._diagnose, every=diagnose_every),
            # After those two, so the row carries their results; telemetry steps are logged too.
            Action("log", self._hold_row, every=cfg.train.log_every,
                   also=lambda t: t.telemetry or bool(t.fired & {"evaluate", "tasks", "diagnose"})),
            # Every step, before the checkpoint, so that a stop is checkpointed at this step.
            Action("stop vote", self._vote, every=1),
            # Last: the guard, then this step's row, then the save: a saved state is finite
            # and its row is on disk before it.
            Action("checkpoint", self._checkpoint, every=cfg.checkpoint.every_steps,
                   also=lambda t: t.last or t.halt),
        ]

    def _dispatch(self) -> periodic.Tick:
        """Queue the next step without waiting for it (the variant with telemetry every
        diagnostics.telemetry_every steps); its non-finite flag goes to the guard unfetched."""
        step = self.step + 1
        telemetry_now = periodic.every(self.cfg.diagnostics.telemetry_every, step)
        batch = self.parts.to_global(next(self.parts.iterator))
        step_fn = self.parts.steps.train_extra if telemetry_now else self.parts.steps.train
        self.state, metrics = step_fn(self.state, batch, np.float32(self.schedule(self.tokens)))
        self.step, self.tokens = step, self.tokens + self.cfg.train.batch_size * self.cfg.data.seq_len
        return periodic.Tick(step, self.tokens, batch, self.guard.record(step, metrics), telemetry_now,
                             last=step == self.cfg.train.steps)

    def _write_previous_row(self, tick: periodic.Tick) -> None:
        """Every step: the row held for an earlier step, its steps checked by the guard."""
        self.rows.flush(upto=tick.step - 1)

    def _evaluate_paused(self, tick: periodic.Tick) -> None:
        """Every train.eval_every steps and at the last; the pause starts once the queued
        steps are done, so it is the evaluation's alone."""
        jax.block_until_ready(tick.metrics)
        with self.rows.paused():
            self._evaluate()

    def _score_tasks_paused(self, tick: periodic.Tick) -> None:
        """Every eval.every steps and at the last: the eval.tasks, paused like the evaluation."""
        jax.block_until_ready(tick.metrics)
        with self.rows.paused():
            self.scores = self.parts.tasks(self.state.params)

    def _evaluate_start(self) -> None:
        """A new run with eval.tasks: evaluate and checkpoint the initial params (step 0), so
        the curves start there and `jaxtrain eval --step 0` can reproduce the row."""
        self._evaluate()
        self.scores = self.parts.tasks(self.state.params)
        self.logger.write({"step": 0, "tokens": self.tokens, **self.val, **self.scores})
        self._save()

    def _diagnose(self, tick: periodic.Tick) -> None:
        """Every diagnostics.every_steps steps: singular values, sharpness into the step's metrics."""
        jax.block_until_ready(tick.metrics)
        with self.rows.paused():
            found = jax.block_until_ready(self.parts.diagnose(self.state.params, tick.batch, tick.step))
        tick.metrics = {**tick.metrics, **found}

    def _hold_row(self, tick: periodic.Tick) -> None:
        """Every train.log_every steps, and steps evaluated, diagnosed or with telemetry: hold
        the row, written once the next step is dispatched (or before this step's checkpoint)."""
        found = {**(self.val if "evaluate" in tick.fired else {}), **(self.scores if "tasks" in tick.fired else {})}
        self.rows.hold(tick.step, tick.tokens, tick.metrics, found or None)

    def _vote(self, tick: periodic.Tick) -> None:
        """Every step: the same answer on every process after the same step; halt on a
        signal or at stop_after."""
        self.stopped_by = self.vote(self.stop)
        tick.halt = self.stopped_by is not None or tick.step == self.stop_after

    def _checkpoint(self, tick: periodic.Tick) -> None:
        """Every checkpoint.every_steps steps, at the last and when halting."""
        self.guard.check()  # never checkpoint a state from a non-finite step
        self.rows.flush()  # a checkpointed step's row is on disk before its checkpoint: a kill never loses it
        saved = self._save()
        if tick.halt:
            self.logger.message(f"stopping: checkpoint {'saved' if saved else 'exists'} at step {tick.step}")

    def _evaluate(self) -> None:
        self.val, self.val_step = self.parts.evaluator(self.state.params), self.step

    def _save(self) -> bool:
        """Checkpoint the current step; the iterator's state is read only here."""
        meta = {"tokens": self.tokens, "step": self.step, "skipped_steps": self.guard.skipped, **self._run_meta}
        return self.ckpt.save(self.step, self.state, self.parts.iterator.get_state(), meta, force=True)


class _Rows:
    """metrics.jsonl rows: a logged step's row is held as device values and written once
    the next step is dispatched, the guard checked up to its step first; tokens/s between
    rows leaves out the pauses marked `paused`."""

    def __init__(self, cfg: Config, logger: MetricsLogger, guard: NonFiniteGuard):
        self.cfg, self.logger, self.guard = cfg, logger, guard
        self._held: tuple[int, int, dict, dict | None] | None = None  # step, tokens, metrics, evaluation
        self._throughput: _Throughput | None = None

    def start(self, tokens: int) -> None:
        """Start the tokens/s clock (when the loop starts)."""
        self._throughput = _Throughput(tokens)

    def hold(self, step: int, tokens: int, metrics: dict, val: dict | None) -> None:
        self._held = (step, tokens, metrics, val)

    def flush(self, upto: int | None = None) -> None:
        """Write the held row, if any, after checking the steps up to `upto` (default all)."""
        if self._held is None:
            return
        self.guard.check(upto=upto)
        self.logger.write({**_row(*self._held, self._throughput, self.cfg), **self.guard.row_fields()})
        self._held = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self._throughput.paused += time.perf_counter() - started


class _Throughput:
    """tokens/s between logged rows, excluding evaluation pauses; ETA from the same rate."""

    def __init__(self, tokens: int):
        self.tokens, self.time, self.paused = tokens, time.perf_counter(), 0.0

    def measure(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time - self.paused, 1e-9)
        self.tokens, self.time, self.paused = tokens, now, 0.0
        return rate


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
