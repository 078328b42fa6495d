"""Who is writing a dataset: `jaxtrain data prepare`'s staging directories, each owned by
one live process, and the check every prepare of the same OUT makes before writing.

    .OUT.tmp-<random>    a writer's private directory while it starts
    .OUT.tmp-staging     the claimed staging directory of OUT, renamed to OUT at commit

Every directory a prepare writes holds MARKER, an owner file (config/ownership.py): its
writer holds an exclusive flock(2) on it for as long as it runs and names itself in it.
The kernel drops the lock when the process ends however it ends (SIGKILL included), so a
free lock means exactly "its writer is gone": no pid guessing, no reused pids, no timeouts. A
later prepare therefore clears a dead writer's leftovers, and refuses, in one line naming
the writer, to touch a live one's. A directory holding metadata.json is a finished
dataset and is never cleared.

Resume: the map of a prepare stages its finished units in `<staging>/units` (units.py).
When a dead writer's claimed staging is cleared, that folder is first moved aside to
`.OUT.units` (under the dead writer's lock, so no one else is clearing it), and the next
writer to claim OUT adopts it into its own staging; the units there are reused only if
they belong to the same plan (plan.py's hash of inputs, settings and tokenizer), and
cleared otherwise. Nothing in `.OUT.units` is a dataset: `open_store` refuses it.

Claiming is a rename: a writer builds its private directory (the marker locked before it
appears under its name) and renames it to `.OUT.tmp-staging`; rename(2) onto an existing
non-empty directory fails, so of two prepares started at the same moment exactly one
holds the claim and the other refuses.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from jaxtrain.config.errors import DataError
from jaxtrain.config import ownership
from jaxtrain.data.token_store import MARKER

_CLAIM = "staging"
UNITS = "units"  # the map's staged units inside a staging directory (units.py)


def _busy(out: Path, writer: str) -> DataError:
    return DataError(f"--out {out}: another `jaxtrain data prepare` ({writer}) is writing this output; "
                     f"wait for it to finish or stop it")


def live_writer(directory: Path) -> str | None:
    """Who is writing `directory` ('held by ...'), or None when no live writer is: then a
    dead writer's unfinished directory has been removed (under its lock, so that no writer
    can claim it meanwhile)."""
    marker = directory / MARKER
    fd = ownership.take_if_abandoned(marker)
    if fd is None:
        return ownership.describe(marker) if marker.exists() else None  # no marker: nothing to judge
    try:
        if not (directory / "metadata.json").exists():
            _salvage_units(directory)
            shutil.rmtree(directory, ignore_errors=True)
        return None
    finally:
        os.close(fd)


def _resume_path(out: Path) -> Path:
    return out.parent / f".{out.name}.units"


def _salvage_units(directory: Path) -> None:
    """Keep a dead claimed staging's finished units for the next writer (`adopt_units`)."""
    suffix = f".tmp-{_CLAIM}"
    if directory.name.endswith(suffix) and (directory / UNITS).is_dir():
        target = _resume_path(directory.parent / directory.name[1:-len(suffix)])
        shutil.rmtree(target, ignore_errors=True)
        (directory / UNITS).rename(target)


def adopt_units(out: Path, staging: Path) -> Path:
    """`staging`/units, holding a dead writer's units if it left some (its caller, the
    claim's owner, checks they belong to the same plan)."""
    try:
        _resume_path(out).rename(staging / UNITS)
    except OSError:
        (staging / UNITS).mkdir(exist_ok=True)
    return staging / UNITS


def prepare_target(out: Path) -> None:
    """Refuse to overwrite a dataset or anything else, or to race a live prepare of OUT;
    clear what a dead one left (its staging, or an OUT renamed into place without metadata)."""
    for staging in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if (writer := live_writer(staging)) is not None:
            raise _busy(out, writer)
    if (out / MARKER).exists() and not (out / "metadata.json").exists():
        if (writer := live_writer(out)) is not None:
            raise _busy(out, writer)
    if out.exists():
        raise DataError(f"--out {out}: already exists; remove it or choose another --out")


def _locked_marker(directory: Path) -> int:
    """Own `directory` through MARKER, locked before it appears under its name."""
    tmp = directory / f"{MARKER}.tmp"
    fd = ownership.take(tmp, "data prepare")
    tmp.rename(directory / MARKER)
    return fd


def claim(out: Path) -> tuple[Path, int]:
    """(staging directory, its locked marker's descriptor): OUT's staging, owned by this
    process until the descriptor is closed. Another live prepare of OUT is a DataError."""
    private = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    private.mkdir(parents=True)
    fd = _locked_marker(private)
    staging = out.parent / f".{out.name}.tmp-{_CLAIM}"
    for _ in range(3):  # a dead writer's claim is cleared and claimed again
        try:
            private.rename(staging)
            return staging, fd
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                release(private, fd)
                raise
            if (writer := live_writer(staging)) is not None:
                release(private, fd)
                raise _busy(out, writer) from None
    release(private, fd)
    raise _busy(out, "a process that keeps reclaiming it")


def release(directory: Path | None, fd: int) -> None:
    """Remove an unfinished staging directory (None: keep it, it is committed) and unlock."""
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
    os.close(fd)
