"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (scheduler preemption).

The first signal only sets a flag: the training loop finishes the step in flight, writes
a checkpoint of it, and the CLI exits with status 128 + signal number (130 for SIGINT,
143 for SIGTERM), the shell convention for "killed by signal". A second signal restores
the default behaviour and interrupts at once (the newest complete checkpoint still
resumes: orbax never exposes a half-written one).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        for sig in _SIGNALS:  # the next signal interrupts immediately
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Install the handlers for the duration of the block (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, request._handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
