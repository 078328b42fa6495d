"""A directory written under a temporary name beside its target and renamed into place
when complete (`jaxtrain export`), owned by its writer while it is written.

A killed writer (SIGKILL, a lost node) leaves its staging directory behind, and nothing of
it runs any more to clean up. Whoever comes next must tell that leftover from the work of a
writer still running. So each staging directory holds an owner file (config/ownership.py):
its writer holds the file's lock until it commits, and the kernel drops the lock however
the writer ends. A later writer of the same target removes the staging directories whose
lock is free and leaves a live writer's alone, on this host or another one sharing the file
system.

    .OUT.staging-RANDOM/        a staging directory of OUT
    .OUT.staging-RANDOM/.owner  its owner file, removed just before the rename

A staging directory without an owner file (made a moment ago, or killed in the instant
between removing it and the rename) is left alone: nothing of unknown origin is removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from jaxtrain.config import ownership

OWNER = ".owner"


class Staging:
    """`with Staging(out, "export") as directory:` write into `directory`; on a clean exit
    it becomes `out` (which must not exist), on an error it is removed."""

    def __init__(self, out: Path, command: str):
        self.out = out.absolute()
        clear_dead_staging(self.out)
        self.directory = self.out.parent / f".{self.out.name}.staging-{secrets.token_hex(4)}"
        self.directory.mkdir()
        self._fd = ownership.take(self.directory / OWNER, command)

    def __enter__(self) -> Path:
        return self.directory

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                (self.directory / OWNER).unlink()
                self.directory.rename(self.out)
            else:
                shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            os.close(self._fd)


def clear_dead_staging(out: Path) -> list[Path]:
    """Remove the staging directories of `out` whose writers are gone; returns them."""
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.staging-*")):
        fd = ownership.take_if_abandoned(path / OWNER)
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(fd)
    return removed
