"""User-facing errors: bad configs, data or paths.

The CLI turns any `UserError` into one line on stderr and exit status 2, without a
traceback; everything else is a bug and keeps its traceback. A file of the run that cannot
be written is a `WriteError`: the path, the free space there and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """Bad input from the user. `str(error)` is the one line shown to them."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has a bad value. `key` is the dotted path, e.g. `model.n_heads`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(UserError):
    """The corpus or a data path cannot be used."""


class WriteError(UserError):
    """A file of the run could not be written (a full disk, a quota, lost permissions, a
    read-only mount): one line with the path, the free space there and what to do. The
    training loop adds which checkpoints are intact (`with_intact`)."""

    def __init__(self, failure: str, advice: str):
        self.failure, self.advice = failure, advice
        super().__init__(f"{failure}; {advice}")

    def with_intact(self, steps: list[int]) -> WriteError:
        return type(self)(f"{self.failure}; intact checkpoints: steps {steps or 'none'}", self.advice)


_ADVICE = {
    errno.ENOSPC: "free space there (or move the workdir) and rerun the same command to resume",
    errno.EDQUOT: "free space under your quota and rerun the same command to resume",
    errno.EFBIG: "the file size limit (ulimit -f) was reached; raise it and rerun to resume",
    errno.EACCES: "make it writable for this user and rerun the same command to resume",
    errno.EPERM: "make it writable for this user and rerun the same command to resume",
    errno.EROFS: "the file system is read-only; use a writable --workdir",
    errno.EISDIR: "a directory stands where the run writes a file; move it aside and rerun",
    errno.ENOTDIR: "a file stands where the run makes a directory; move it aside and rerun",
    errno.EEXIST: "a file stands where the run makes a directory; move it aside and rerun",
}


RERUN = "rerun the same command to resume once it is fixed"


def write_failure(what: str, path: Path, err: OSError) -> WriteError:
    """`what PATH: <reason> (<free> free of <size> on <mount>); <what to do>`."""
    reason, advice = explain_os_error(path, err)
    return WriteError(f"{what} {path}: {reason}", advice)


def explain_os_error(path: Path, err: OSError) -> tuple[str, str]:
    """(the reason with the free space where `path` is, what to do)."""
    reason = (err.strerror or str(err)).lower()
    return f"{reason}{free_space(path)}", _ADVICE.get(err.errno, RERUN)


def free_space(path: Path) -> str:
    """' (0 B free of 3.0 MB on /mnt/x)' for the file system holding `path` ('' if unknown)."""
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if existing is None:
        return ""
    mount = existing
    while not os.path.ismount(mount):
        mount = mount.parent
    usage = shutil.disk_usage(existing)
    return f" ({_size(usage.free)} free of {_size(usage.total)} on {mount})"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn an OSError of the block into `write_failure`'s one line."""
    try:
        yield
    except OSError as err:
        raise write_failure(what, path, err) from None
