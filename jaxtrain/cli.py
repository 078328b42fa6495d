"""`jaxtrain <command>`: thin entry points over the library.

    jaxtrain train CONFIG --workdir DIR [--set key.path=value ...]

Bad input (config, data, paths) prints one line `jaxtrain: error: ...` and exits 2;
`JAXTRAIN_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxtrain.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) a run in a workdir")
    train.add_argument("config", help="YAML experiment file, e.g. configs/small.yaml")
    train.add_argument("--workdir", required=True, help="run directory; rerunning on it resumes")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.d_model=512 (repeatable)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from jaxtrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    from jaxtrain.train import run  # imports jax: only once the config is known to be valid

    result = run(cfg, args.workdir)
    if result.stop_signal is not None:
        print(f"jaxtrain: stopped by signal {result.stop_signal} after step {result.step}; "
              f"rerun the same command to resume", file=sys.stderr)
        return 128 + result.stop_signal
    print(f"final val_loss {result.val_loss:.4f} nats/byte ({result.val_loss / math.log(2):.3f} bits/byte) "
          f"at step {result.step}; byte-unigram entropy of the corpus {result.unigram_entropy:.4f} nats/byte")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": _train}[args.command](args)
    except UserError as err:
        if os.environ.get("JAXTRAIN_DEBUG"):
            raise
        print(f"jaxtrain: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
