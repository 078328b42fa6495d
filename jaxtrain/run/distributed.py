"""Multi-host start-up on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same `jaxtrain train` command; `jax.distributed.initialize` joins
them into one runtime whose `jax.devices()` lists the devices of all processes, so the
mesh, the jitted step and orbax's collective checkpoints span the whole job. Each process
feeds only its own slice of every global batch (`data/pipeline.py`) and only process 0
writes logs.

Where the process group comes from, first match wins:
  1. explicit flags   --coordinator HOST:PORT --num-processes N --process-id I
  2. environment      JAXTRAIN_COORDINATOR, JAXTRAIN_NUM_PROCESSES, JAXTRAIN_PROCESS_ID
  3. a cluster JAX detects by itself: a SLURM job step with several tasks (srun), or a
     TPU VM pod with more than one worker; `jax.distributed.initialize()` reads the
     coordinator, process count and index from the scheduler's environment
  4. none of these: a single process, nothing is initialized

On CPU the cross-process collectives use gloo (`jax_cpu_collectives_implementation`),
which is how the multi-process tests run on 127.0.0.1.

A dead peer: the coordination service expects a heartbeat from every process; when one
stops (killed, machine lost) the others are terminated with an error within about
`peer_timeout` seconds (and a collective blocked on the dead peer fails as soon as its
connection drops), rather than hanging forever. The scheduler then restarts the job, which
resumes from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from jaxtrain.config.errors import UserError

ENV_COORDINATOR = "JAXTRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXTRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXTRAIN_PROCESS_ID"
DEFAULT_PEER_TIMEOUT = 30  # seconds without a heartbeat before a process counts as dead


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """An explicit process group; `cluster` means JAX reads it from SLURM / the TPU pod."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None


def _int_or_error(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r}: expected an integer") from None


def _cluster_from_environment(environ: dict[str, str]) -> str | None:
    """The scheduler that launched several copies of this command, if any."""
    # tasks of this srun step (the batch script itself is a one-task step)
    if (_int_or_error(environ.get("SLURM_STEP_NUM_TASKS"), "SLURM_STEP_NUM_TASKS") or 1) > 1:
        return "slurm"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu pod"
    return None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            environ: dict[str, str] | None = None) -> ProcessGroup | None:
    """The process group this command belongs to (None: run as a single process)."""
    environ = dict(os.environ if environ is None else environ)
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int_or_error(
        environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_or_error(
        environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise UserError(f"{missing[0]}: needed with the other multi-process settings "
                            f"(flag or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
        if ":" not in coordinator:
            raise UserError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if num_processes < 1:
            raise UserError(f"--num-processes {num_processes}: must be at least 1")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id}: must be in [0, {num_processes})")
        return None if num_processes == 1 else ProcessGroup(coordinator, num_processes, process_id)
    cluster = _cluster_from_environment(environ)
    return ProcessGroup(cluster=cluster) if cluster else None


def initialize(group: ProcessGroup | None, peer_timeout: int = DEFAULT_PEER_TIMEOUT) -> None:
    """Join the process group (no-op for a single process). Must run before any jax
    computation; the CPU backend then talks to the other processes through gloo."""
    if group is None:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=group.coordinator, num_processes=group.num_processes,
        process_id=group.process_id, heartbeat_timeout_seconds=peer_timeout,
        initialization_timeout=max(peer_timeout, 60), shutdown_timeout_seconds=peer_timeout)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for a single process): what
    process 0 wrote before it is there for the others to read after it."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
