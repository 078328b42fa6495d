"""The `jaxtrain` subcommands: each module holds a few commands, each command's argparse
parser next to its handler (`set_defaults(func=...)`). Handlers import the library lazily,
so `jaxtrain --help` and a bad argument answer without loading JAX."""

from jaxtrain.commands import data, experiments, harness, huggingface, runs, schedules, training

MODULES = (training, schedules, experiments, runs, data, huggingface, harness)


def add_all(commands) -> None:
    """Register every subcommand on an argparse subparsers object."""
    for module in MODULES:
        module.add_parsers(commands)
