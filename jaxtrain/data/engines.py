"""Where the map of a prepare runs: this process, a local process pool, or Ray.

    map_units(job, units, engine, workers, address) -> every unit's info, in plan order

* `--workers 1`: in this process, one unit after another (the `tokenizers` library still
  encodes each batch on every core).
* `--workers N` (default: every core): a pool of N processes (concurrent.futures,
  started by `spawn`, so no worker inherits the driver's threads or a forked tokenizer),
  each using cores/N of the `tokenizers` library's threads. Nothing to install or start.
* `--engine ray`: the map runs as Ray tasks, one CPU each: `ray.init()` starts a local
  instance with N CPUs, or `--ray-address ADDR` (or RAY_ADDRESS) joins a running cluster
  (`ray start --head` on one node, `ray start --address HEAD:6379` on the others). Units
  are staged beside --out, so on a cluster --out must be on a file system every node
  mounts (NFS, Lustre, ...); every node needs jaxtrain and its dependencies installed.

The results come back in plan order with at most 4 x N units in flight (the oldest is
waited for before another is submitted), so the driver merges each unit as soon as it and
all before it are done, and no more than 4 x N finished units wait on disk unmerged. The
store is therefore the same whatever the engine and the number of workers: units are pure
functions of their inputs, and the merge order is the plan's.

Why Ray for the distributed engine. The map is an embarrassingly parallel loop over
independent units, whose only shared state is a file system, so the engine needs little:
start workers with no setup on a laptop, and run the same code over many nodes.
* Ray: `ray.init()` starts a local instance in the process, with nothing configured, and
  the same tasks run on a cluster made with `ray start`, KubeRay on Kubernetes, or a SLURM
  allocation. Levanter, a JAX LLM trainer, builds its tokenized caches this way
  (stanford-crfm/levanter, src/levanter/store/cache.py, `build_or_load_cache`: "a
  sharded cache of the dataset using Ray for distributed processing").
* Apache Beam: multi-node needs a Flink, Spark or Dataflow runner set up; its
  DirectRunner is documented as validating pipelines against the Beam model "instead of
  focusing on efficient pipeline execution" (beam.apache.org, Direct Runner).
* datatrove: runs locally or on SLURM (and Ray, in recent releases) but brings its own
  Document and pipeline-block model with readers that split work by file per task, which
  would replace the readers, the split and the row-group units here rather than run them.
Ray stays optional (`pip install 'jaxtrain[distributed]'`): the local pool needs nothing.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Iterator

from jaxtrain.config.errors import DataError
from jaxtrain.data.plan import Unit
from jaxtrain.data.units import Job, run_unit

ENGINES = ("local", "ray")
_INSTALL = "pip install 'jaxtrain[distributed]'  (or: pip install 'ray[data]>=2.40')"


def _in_order(submit: Callable, wait: Callable, units: list[Unit], window: int) -> Iterator[dict]:
    """Results of `submit(unit)` in unit order, at most `window` submitted and unmerged."""
    pending: collections.deque = collections.deque()
    remaining = iter(units)
    for unit in remaining:
        pending.append(submit(unit))
        if len(pending) == window:
            break
    while pending:
        result = wait(pending.popleft())
        if (unit := next(remaining, None)) is not None:
            pending.append(submit(unit))
        yield result


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _exit_with_parent(parent: int) -> None:
    """A pool worker's initializer: end the worker once its prepare is gone. A SIGKILLed
    prepare cannot shut its pool down, and a worker blocked on the pool's call queue never
    sees it end (it holds that queue's pipe ends itself), so it would wait forever."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _local(job: Job, units: list[Unit], workers: int) -> Iterator[dict]:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    def wait(future):
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(f"--workers {workers}: a worker process died (killed, or out of memory: "
                            f"try fewer --workers)") from None

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        try:
            yield from _in_order(lambda u: pool.submit(run_unit, job, u), wait, units, 4 * workers)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def require(engine: str):
    """The engine's module (Ray), or None for the local pool; checked before any work."""
    if engine not in ENGINES:
        raise DataError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "local":
        return None
    try:
        import ray
    except ImportError:
        raise DataError(f"--engine ray: Ray is not installed; {_INSTALL}") from None
    return ray


def _ray(job: Job, units: list[Unit], workers: int, address: str | None) -> Iterator[dict]:
    ray = require("ray")
    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        local = {"num_cpus": workers,  # a local instance's workers import jaxtrain from where this one does
                 "runtime_env": {"env_vars": {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}}
        ray.init(**({"address": address} if address else local), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    task = ray.remote(num_cpus=1, max_retries=2)(run_unit)

    def wait(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the worker's exception, as raised there
            raise err.cause if isinstance(err.cause, DataError) else err from None

    try:
        yield from _in_order(lambda u: task.remote(job, u), wait, units, 4 * workers)
    finally:
        if started:
            ray.shutdown()


def map_units(job: Job, units: list[Unit], engine: str = "local", workers: int = 1,
              address: str | None = None) -> Iterator[dict]:
    """Every unit staged (or reused), its info yielded in plan order."""
    require(engine)
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    if engine == "ray":
        return _ray(job.with_threads(_threads(workers)), units, workers, address)
    if workers == 1 or len(units) == 1:
        return (run_unit(job, unit) for unit in units)
    return _local(job.with_threads(_threads(workers)), units, min(workers, len(units)))
