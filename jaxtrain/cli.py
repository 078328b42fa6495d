"""`jaxtrain <command>`: thin entry points over the library.

    jaxtrain train CONFIG --workdir DIR [--set key.path=value ...]
    jaxtrain sweep CONFIG --grid key=v1,v2,... [--grid ...] --out DIR
    jaxtrain coord-check CONFIG --widths 64,128,256 [--depths 2,4] --steps 5 --out DIR
    jaxtrain bench CONFIG [--steps 10 --warmup 2 --set ...]   (one JSON line)

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
    sweep = commands.add_parser("sweep", help="train a grid of short runs; loss vs learning rate per width/depth")
    sweep.add_argument("config")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a swept config key and its values (repeatable; the product is run)")
    sweep.add_argument("--out", required=True, help="sweep directory (rerunning resumes it)")
    sweep.add_argument("--x", default="optimizer.lr", help="the grid key on the x axis (log2)")
    sweep.add_argument("--curves", default=None, help="the grid key drawn as separate curves "
                                                      "(default: the first other --grid key)")
    _add_set(sweep)
    coord = commands.add_parser("coord-check", help="muP coordinate check: activation RMS vs width")
    coord.add_argument("config")
    coord.add_argument("--widths", required=True, help="comma-separated d_model values")
    coord.add_argument("--depths", default=None, help="comma-separated n_layers values (default: the config's)")
    coord.add_argument("--steps", type=int, default=5, help="optimizer updates to record (default 5)")
    coord.add_argument("--out", required=True)
    _add_set(coord)
    bench = commands.add_parser("bench", help="time the compiled train step: tokens/s, MFU, memory (one JSON line)")
    bench.add_argument("config")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    _add_set(bench)
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run (repeatable)")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise UserError(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxtrain.sweep import StopSweep, parse_grid, sweep

    try:
        results = sweep(args.config, parse_grid(args.grid), Path(args.out), overrides=args.overrides,
                        x_key=args.x, curve_key=args.curves)
    except StopSweep as stopped:
        print(f"jaxtrain: sweep stopped by a signal during {stopped}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    for d in results["drift"]:
        panel = ", ".join(f"{k}={d[k]}" for k in results["panels"]) or "all"
        print(f"{panel}: optimum moved {d['drift_steps']:+.2f} grid steps from "
              f"{results['curve']}={d['from']} to {d['to']}")
    print(f"wrote {args.out}/results.json, results.csv, sweep.png")
    return 0


def _coord_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxtrain.config import load_config
    from jaxtrain.coord_check import coord_check

    if args.steps <= 0:
        raise UserError(f"--steps {args.steps}: must be positive")
    cfg = load_config(args.config, args.overrides)
    depths = _int_list(args.depths, "--depths") if args.depths else None
    report = coord_check(cfg, _int_list(args.widths, "--widths"), depths, args.steps, Path(args.out))
    for name, slope in report["slopes"][str(args.steps)].items():
        print(f"{name}: log-log slope of RMS vs width at step {args.steps}: {slope:+.3f}")
    print(f"wrote {args.out}/coord_check.json and coord_check.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from jaxtrain.config import load_config

    if args.steps <= 0 or args.warmup < 0:
        raise UserError(f"--steps {args.steps} --warmup {args.warmup}: need steps > 0 and warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    from jaxtrain.bench import bench

    print(json.dumps(bench(cfg, args.steps, args.warmup)))
    return 0


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


# XLA:CPU flag measured to speed up the train step (docs/performance.md): YNNPACK fusions
# off, so matmuls go to XLA's own dot emitter (+19% tokens/s on the CPU benchmark model).
# Only for the jaxlib minor version it was measured on: an unknown XLA flag aborts.
_CPU_XLA_FLAGS = {"0.10.": "--xla_cpu_experimental_ynn_fusion_type="}


def _tune_cpu_xla() -> None:
    """Add the measured XLA:CPU flag before jax starts, unless the user set XLA flags of
    that name or JAXTRAIN_DEFAULT_XLA=1 asks for XLA's own defaults."""
    from jaxlib.version import __version__ as jaxlib_version  # does not start a backend

    flags = os.environ.get("XLA_FLAGS", "")
    for version, flag in _CPU_XLA_FLAGS.items():
        name = flag.split("=")[0]
        if jaxlib_version.startswith(version) and name not in flags and not os.environ.get("JAXTRAIN_DEFAULT_XLA"):
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: list[str] | None = None) -> int:
    _tune_cpu_xla()
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "sweep": _sweep, "coord-check": _coord_check,
                "bench": _bench}[args.command](args)
    except UserError as err:
        if os.environ.get("JAXTRAIN_DEBUG"):
            raise
        print(f"jaxtrain: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
