"""Work in progress that names its writer: staging directories whose names carry the host
and process id of the process writing them.

A command that writes a directory under a temporary name and renames it when complete
(`jaxtrain export`) leaves its work behind if it is killed (SIGKILL, a lost node): nothing of it runs any more to clean
up. Whoever comes next must tell that leftover from the work of a writer still running,
and a name alone says nothing about that. So the writer's identity is part of the name,
created with it in one system call (a `mkdir` or an exclusive file creation; an owner
file written afterwards would leave a window where a kill leaves an anonymous leftover):

    .OUT.staging.HOST.PID.RANDOM/     a staging directory of OUT (`make_staging`)

(A workdir is filled in place under its owner's lock instead: jaxtrain/run/workdir.py.)

A writer is dead when it ran on this host and its process id is gone; a writer on another
host (a shared file system) cannot be checked from here and counts as alive, so its work
is never removed by mistake. A reused process id makes a dead writer look alive: its
leftover stays until that process ends, which is the safe side.

Base layer: imports nothing of jaxtrain, so every layer (data included) may use it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from pathlib import Path

STAGING = "staging"


def _host() -> str:
    """This host's name, as it goes into names (dots kept; anything odd replaced)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def identity() -> str:
    """`HOST.PID` of this process."""
    return f"{_host()}.{os.getpid()}"


def _parse(tag: str) -> tuple[str, int] | None:
    """`HOST.PID` -> (host, pid), None if `tag` is not one."""
    host, _, pid = tag.rpartition(".")
    return (host, int(pid)) if host and pid.isdigit() else None


def writer_alive(tag: str) -> bool:
    """Whether the writer `HOST.PID` may still be running (see the module docstring).
    An unreadable tag counts as alive: nothing of unknown origin is removed."""
    parsed = _parse(tag)
    if parsed is None or parsed[0] != _host():
        return True
    try:
        os.kill(parsed[1], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def make_staging(out: Path) -> Path:
    """A new staging directory beside `out`, named by this process."""
    out = out.absolute()
    staging = out.parent / f".{out.name}.{STAGING}.{identity()}.{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def staging_writer(out: Path, staging: Path) -> str | None:
    """The `HOST.PID` of a staging directory of `out`, None if it is not one."""
    prefix = f".{out.absolute().name}.{STAGING}."
    if not staging.name.startswith(prefix):
        return None
    tag, _, token = staging.name[len(prefix):].rpartition(".")
    return tag if token and _parse(tag) else None


def clear_dead_staging(out: Path) -> list[Path]:
    """Remove the staging directories of `out` whose writers are dead; returns them.
    A live writer's (this process's included) are left alone."""
    out = out.absolute()
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.{STAGING}.*")):
        tag = staging_writer(out, path)
        if tag is not None and path.is_dir() and not writer_alive(tag):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
