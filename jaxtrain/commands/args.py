"""Argument types and flag groups shared by the subcommands.

A `type=` validator raises `argparse.ArgumentTypeError("VALUE: why")`; `cli.OneLineParser`
turns that into the one line `jaxtrain: error: --flag VALUE: why` (exit 2), like every
other bad input.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(text: str, kind: type, low: float, what: str, high: float = math.inf, open_low: bool = False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected {what}") from None
    if not (low < value if open_low else low <= value) or not value <= high or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be {what}")  # nan and inf included
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, "a positive number", open_low=True)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, "a finite number >= 0")


def fraction_in_unit_interval(text: str) -> float:
    """[0, 1], e.g. a learning rate as a fraction of the peak."""
    return _number(text, float, 0.0, "a number in [0, 1]", high=1.0)


def open_fraction(text: str) -> float:
    """(0, 1), e.g. the share of documents held out."""
    return _number(text, float, 0.0, "a number strictly between 0 and 1", high=math.nextafter(1.0, 0.0),
                   open_low=True)


def int_up_to(high: int):
    """A type for an integer in [1, high]."""
    def bounded(text: str) -> int:
        return _number(text, int, 1, f"an integer from 1 to {high:,}", high=high)
    return bounded


def steps_or_fraction(text: str) -> int | float:
    """A length as steps (an integer >= 1, e.g. 200) or as a fraction in (0, 1) (e.g. 0.2)."""
    what = "a number of steps (e.g. 200) or a fraction in (0, 1)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected {what}") from None
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text}: expected {what}")


def utf8_text(text: str) -> str:
    """Non-empty text that encodes as UTF-8 (a terminal in another locale can pass bytes
    Python holds as lone surrogates)."""
    if not text:
        raise argparse.ArgumentTypeError("'': must contain at least one character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 (character {err.start}); jaxtrain reads it as "
                                         f"UTF-8 text") from None
    return text


def positive_int_list(text: str) -> list[int]:
    """`64,128,256` -> [64, 128, 256]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return values


def file_to_write(text: str) -> str:
    """A file the command will write: its directory must already exist."""
    if not Path(text).absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its directory does not exist")
    return text


def add_set(parser: argparse.ArgumentParser, help: str = "override a config value in every run (repeatable)") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_process_group(parser: argparse.ArgumentParser) -> None:
    """The flags of a training entry point that may run as one of several processes."""
    group = parser.add_argument_group("multi-process (jaxtrain/run/distributed.py; default: SLURM/TPU pod "
                                      "auto-detection, else one process)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=positive_int, default=None, metavar="N")
    group.add_argument("--process-id", type=non_negative_int, default=None, metavar="I")
    group.add_argument("--peer-timeout", type=positive_int, default=None, metavar="SECONDS",
                       help="exit with an error when a peer process is silent this long (default 30)")


def join_process_group(args: argparse.Namespace) -> None:
    """Every training entry point joins the process group before touching devices."""
    from jaxtrain.run import distributed

    group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
    distributed.initialize(group, args.peer_timeout or distributed.DEFAULT_PEER_TIMEOUT)
