"""Who is writing a place on the file system, told by a lock the kernel keeps.

A writer holds an exclusive flock(2) on an owner file for as long as it runs, and writes
its name into it: the command, process id, host and since when. The kernel drops the lock
however the process ends (SIGKILL and a lost node's process group included), so a free lock
means exactly "its writer is gone": no process-id guessing, no reused ids, no stale lock to
clean, and it holds for writers on other machines of a shared file system (NFS carries
flock as a whole-file lock kept by the server; Lustre does with `-o flock`).

Three places use it: a workdir's one owner (run/workdir.py), `data prepare`'s staging
directories (data/staging.py) and `export`'s (tools/huggingface_export.py).

A process keeps the descriptor `take` returns for as long as it owns the place; closing
it (or exiting) gives the place up. A second `take` of the same file in the same process
conflicts too (flock locks belong to open files, not processes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a file system without flock


class Owned(Exception):
    """The place is owned by a live writer; `str(error)` describes it."""


class NoLocks(Exception):
    """The file system does not lock files; `str(error)` is its reason."""


def take(path: Path, command: str) -> int:
    """Own `path` (created if missing): its locked descriptor, the owner's name written in.
    `Owned` if a live writer holds it, `NoLocks` if the file system cannot lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Owned(describe(path)) from None
        if err.errno in NO_LOCKS:
            raise NoLocks(err.strerror) from None
        raise
    try:
        owner = {"command": command, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner).encode())
    except OSError:
        os.close(fd)
        raise
    return fd


def take_if_abandoned(path: Path) -> int | None:
    """The locked descriptor of an existing owner file whose writer is gone (to clear what it
    left while no one else can), or None while its writer lives or when there is no such
    file. Close the descriptor when done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    try:
        replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        replaced = True  # removed meanwhile by a writer that finished
    if replaced:
        os.close(fd)
        return None
    return fd


def describe(path: Path) -> str:
    """'held by `jaxtrain train` (pid 12, host h) since <UTC time>', from what the owner
    wrote once it held the lock (waiting briefly: it writes right after locking)."""
    for _ in range(20):
        try:
            owner = json.loads(path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner["since"]))
            return f"held by `jaxtrain {owner['command']}` (pid {owner['pid']}, host {owner['host']}) since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "held by another process"
