"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (scheduler preemption).

The first signal only records a request: the training loop finishes the step in flight,
writes a checkpoint of it synchronously, and the CLI exits with status 128 + signal number
(130 for SIGINT, 143 for SIGTERM), the shell convention for "killed by signal". Exit
status meanings (also in launch/README.md):

  0    finished train.steps
  130  stopped by SIGINT,  checkpoint of the reported step written
  143  stopped by SIGTERM, checkpoint of the reported step written
  124  the grace period (`train.grace_period_sec`, default 60 s) ran out before that
       checkpoint was complete: the process exits anyway, and the newest *complete*
       checkpoint resumes (orbax never exposes a half-written one)

A second signal exits at once with 128 + signal number. Signals are watched by a thread
woken through `signal.set_wakeup_fd`, so the grace timer starts when the signal arrives,
even while the main thread is blocked inside a long device computation.

With several processes, `StopVote` makes every process stop after the same step, even
when the scheduler signalled only some of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

import numpy as np

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_EXPIRED_STATUS = 124


class StopRequest:
    """The first stop signal this process received (`signum`), if any."""

    def __init__(self, grace_period: float = 60.0) -> None:
        self.signum: int | None = None
        self.grace_period = grace_period
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def receive(self, signum: int) -> None:
        with self._lock:
            if self.signum is not None:  # a second signal: stop now
                print(f"jaxtrain: second signal {signum}: exiting without waiting for the checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.signum = signum
        self._timer = threading.Timer(self.grace_period, self._grace_expired)
        self._timer.daemon = True
        self._timer.start()

    def cancel_grace(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _grace_expired(self) -> None:
        print(f"jaxtrain: the grace period of {self.grace_period:g} s after signal {self.signum} ran out "
              f"before the checkpoint was complete; exiting with status {GRACE_EXPIRED_STATUS} "
              f"(rerunning resumes from the newest complete checkpoint)", file=sys.stderr, flush=True)
        os._exit(GRACE_EXPIRED_STATUS)


def _watch(read_fd: int, request: StopRequest) -> None:
    """Each byte on the wakeup pipe is one signal number delivered to this process."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:  # the pipe was closed: the block ended
            return
        if not data:
            return
        for signum in data:
            if signum in _SIGNALS:
                request.receive(signum)


@contextlib.contextmanager
def stop_on_signal(grace_period: float = 60.0) -> Iterator[StopRequest]:
    """Catch SIGINT/SIGTERM for the duration of the block (handlers can only be installed
    from the main thread; elsewhere the request simply never fires)."""
    request = StopRequest(grace_period)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:  # the C-level handler writes the signal number to the wakeup pipe
        signal.signal(sig, lambda signum, frame: None)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd, request), name="jaxtrain-signals", daemon=True)
    watcher.start()
    try:
        yield request
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)
        watcher.join(timeout=1.0)
        os.close(read_fd)
        request.cancel_grace()  # the block is over: the checkpoint is complete


class StopVote:
    """Agree across processes on when to stop and why.

    Single process: the local request, at once. Several processes: every step each process
    contributes its signal number (0 = none) to a max-reduction over all devices; the result
    is read one step later, so the vote never stalls the dispatch of the next step. All
    processes therefore see the same answer after the same step and checkpoint that step
    together.
    """

    def __init__(self) -> None:
        import jax

        self._multi = jax.process_count() > 1
        self._pending = None
        if self._multi:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            mesh = Mesh(np.array(jax.devices()), ("processes",))
            self._sharding = NamedSharding(mesh, P("processes"))
            self._local = len(jax.local_devices())
            self._max = jax.jit(lambda votes: votes.max(), out_shardings=NamedSharding(mesh, P()))

    def __call__(self, request: StopRequest) -> int | None:
        """The signal number all processes stop for after this step, or None to go on."""
        if not self._multi:
            return request.signum
        import jax

        local = np.full((self._local,), request.signum or 0, np.int32)
        vote = self._max(jax.make_array_from_process_local_data(self._sharding, local))
        previous, self._pending = self._pending, vote
        agreed = 0 if previous is None else int(previous.addressable_data(0))
        return agreed or None
