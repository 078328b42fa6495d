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
`JAXTRAIN_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from jaxtrain import commands, xla_flags
from jaxtrain.errors import UserError


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


def main(argv: list[str] | None = None) -> int:
    xla_flags.tune_cpu_xla()
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        if os.environ.get("JAXTRAIN_DEBUG"):
            raise
        print(f"jaxtrain: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
