"""`jaxtrain <command>`: the entry point. Each command's parser and handler live together
in jaxtrain/commands/ (training, schedules, experiments, runs, data, huggingface); this
module assembles them and turns every bad input into one line.

    jaxtrain train CONFIG --workdir DIR [--set key.path=value ...]
    jaxtrain cooldown WORKDIR --step N --decay STEPS|FRACTION --workdir NEW
    jaxtrain schedule | fit-schedule-law | sweep | coord-check | bench | dry-run
    jaxtrain eval | generate | plot WORKDIR ...
    jaxtrain data prepare | data bench, export, import
    (`jaxtrain COMMAND --help` for each; docs/usage.md for all of them)

Bad input (config, data, paths, flags) prints one line `jaxtrain: error: ...` and exits 2;
`JAXTRAIN_DEBUG=1` shows the traceback instead. A file the run could not write (a full
disk, lost permissions) is one such line too, after which the program exits at once:
orbax's and tensorboardX's background writers may still be blocked on the file system,
and waiting for them at shutdown would hang the job (or bury the line in their reports).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from jaxtrain import commands
from jaxtrain.config.errors import UserError, WriteError
from jaxtrain.run import xla_flags


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError (one line, exit 2) instead of usage + message.
    `argument --flag: VALUE: why` from a `type=` validator reads `--flag VALUE: why`."""

    def error(self, message: str):
        flagged = re.fullmatch(r"argument ([^:]+): (.*)", message)
        if flagged:
            flag = flagged.group(1).split("/")[-1]
            message = f"{flag} {flagged.group(2)}" if ": " in flagged.group(2) else f"{flag}: {flagged.group(2)}"
        raise UserError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    root = OneLineParser(prog="jaxtrain", description=__doc__.splitlines()[0])
    subcommands = root.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands.add_all(subcommands)
    return root


def _dispatch(argv: list[str] | None) -> int:
    xla_flags.tune_cpu_xla()
    args = parser().parse_args(argv)
    return args.func(args)


def _report(err: UserError) -> int:
    if os.environ.get("JAXTRAIN_DEBUG"):
        raise err
    print(f"jaxtrain: error: {err}", file=sys.stderr, flush=True)
    return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (for callers in Python, e.g. the tests)."""
    try:
        return _dispatch(argv)
    except UserError as err:
        return _report(err)


def program() -> None:
    """The console script and `python -m jaxtrain`: `main`, and after a failed write an
    immediate exit that abandons the background writer threads."""
    try:
        status = _dispatch(None)
    except WriteError as err:
        status = _report(err)
        sys.stdout.flush()
        os._exit(status)
    except UserError as err:
        status = _report(err)
    sys.exit(status)


if __name__ == "__main__":
    program()
