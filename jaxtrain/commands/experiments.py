"""The experiment commands: grids of short runs, the muP coordinate check, the step
benchmark and the dry run.

    jaxtrain sweep CONFIG --grid key=v1,v2,... [--grid ...] --out DIR [--x KEY --curves KEY]
                   [--equal-tokens] [--fit lr~batch,tokens] [--branch-horizons]
    jaxtrain coord-check CONFIG --widths 64,128,256 [--depths 2,4] --steps 5 --out DIR
    jaxtrain bench CONFIG [--steps 10 --warmup 2 --hlo-out FILE --set ...]   (one JSON line)
    jaxtrain dry-run CONFIG [--devices N --backend gpu] [--compile] [--target NAME [--fit]] [--schedule-png FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxtrain.config.errors import UserError
from jaxtrain.commands.args import add_set, file_to_write, non_negative_int, positive_int, positive_int_list
from jaxtrain.run import xla_flags


def add_parsers(commands) -> None:
    sweep = commands.add_parser("sweep", help="train a grid of short runs; the optimum per curve, its drift along "
                                              "any axis, power-law fits")
    sweep.add_argument("config")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a swept config key and its values (repeatable; the product is run)")
    sweep.add_argument("--out", required=True, help="sweep directory, a cache keyed by each run's config "
                                                    "(rerunning resumes it; docs/usage.md)")
    sweep.add_argument("--x", default="optimizer.lr", help="the grid key on the x axis (log2)")
    sweep.add_argument("--curves", default=None, help="the grid key drawn as separate curves, along which the "
                                                      "optimum's drift is measured (width, train.batch_size, "
                                                      "train.steps, optimizer.weight_decay ...; default: the "
                                                      "first other --grid key)")
    sweep.add_argument("--equal-tokens", action="store_true",
                       help="train every grid point on the config's token budget (train.steps x batch_size x "
                            "seq_len): train.steps derived per point, for a --grid over train.batch_size")
    sweep.add_argument("--fit", action="append", default=[], metavar="X~C1,C2,...",
                       help="fit log2 x_opt = log2 a + sum alpha_i log2 c_i over the per-cell optima (e.g. "
                            "lr~batch,tokens; covariates: grid keys, their last part, batch, width, wd, "
                            "tokens, steps); repeatable")
    sweep.add_argument("--branch-horizons", action="store_true",
                       help="with --grid train.steps and a wsd/power schedule: train the longest horizon of each "
                            "cell and branch the shorter ones from its checkpoints (jaxtrain cooldown)")
    add_set(sweep)
    sweep.set_defaults(func=sweep_command)

    coord = commands.add_parser("coord-check", help="muP coordinate check: activation RMS vs width")
    coord.add_argument("config")
    coord.add_argument("--widths", required=True, type=positive_int_list, help="comma-separated d_model values")
    coord.add_argument("--depths", default=None, type=positive_int_list,
                       help="comma-separated n_layers values (default: the config's)")
    coord.add_argument("--steps", type=positive_int, default=5, help="optimizer updates to record (default 5)")
    coord.add_argument("--out", required=True)
    add_set(coord)
    coord.set_defaults(func=coord_check_command)

    bench = commands.add_parser("bench", help="time the compiled train step: tokens/s, MFU, memory (one JSON line)")
    bench.add_argument("config")
    bench.add_argument("--steps", type=positive_int, default=10, help="timed steps (default 10)")
    bench.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps after compiling (default 2)")
    bench.add_argument("--hlo-out", default=None, type=file_to_write, metavar="FILE",
                       help="write the compiled step's HLO text there (count its collectives with "
                            "jaxtrain.tools.hlo_collectives)")
    add_set(bench)
    bench.set_defaults(func=bench_command)

    dry = commands.add_parser("dry-run", help="resolve a config: params by role, shardings, FLOPs, memory, schedule")
    dry.add_argument("config")
    dry.add_argument("--devices", type=positive_int, default=None,
                     help="simulated device count for the mesh (default: this machine's)")
    dry.add_argument("--schedule-png", default=None, type=file_to_write, metavar="FILE",
                     help="also plot the LR schedule")
    dry.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None,
                     help="platform the run is planned for: sets dtype/attention under auto "
                          "(default: this machine's)")
    dry.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    dry.add_argument("--skip-memory-check", action="store_true",
                     help="print the plan even if it exceeds this machine's memory (planned for its devices)")
    dry.add_argument("--compile", action="store_true",
                     help="also compile the step (for --target with its compiler, else on --devices simulated "
                          "CPU devices): its memory, collectives and attention kernel")
    dry.add_argument("--target", default=None, metavar="NAME",
                     help="plan for a named cluster (h100, h100x8, h100x8x4, tpu-v5p-8, tpu-v5p-32, tpu-v6e-8, ...; "
                          "jaxtrain/tools/targets.py): its devices, platform and roofline")
    dry.add_argument("--fit", action="store_true",
                     help="with --target: compile remat x microbatch plans for it, fastest first by the roofline, "
                          "and print the --set overrides of the first that fits")
    add_set(dry)
    dry.set_defaults(func=dry_run_command)


def sweep_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.optimum_law import describe
    from jaxtrain.tools.sweep import StopSweep, parse_grid, sweep

    try:
        results = sweep(args.config, parse_grid(args.grid), Path(args.out), overrides=args.overrides,
                        x_key=args.x, curve_key=args.curves, equal_tokens=args.equal_tokens, fits=args.fit,
                        branch_horizons=args.branch_horizons)
    except StopSweep as stopped:
        print(f"jaxtrain: sweep stopped by a signal during {stopped}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    for d in results["drift"]:
        panel = ", ".join(f"{k}={d[k]}" for k in results["panels"]) or "all"
        per = d["steps_per_doubling"]
        print(f"{panel}: optimum moved {d['drift_steps']:+.2f} grid steps from {results['curve']}={d['from']} "
              f"to {d['to']}" + ("" if per is None else f" ({per:+.2f} per doubling)"))
    for fit in results["fits"]:
        print(describe(fit))
    print(f"wrote {args.out}/results.json, results.csv, sweep.png" + (", fits.png" if results["fits"] else ""))
    return 0


def coord_check_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config
    from jaxtrain.tools.coord_check import coord_check

    cfg = load_config(args.config, args.overrides)
    report = coord_check(cfg, args.widths, args.depths, args.steps, Path(args.out))
    for name, slope in report["slopes"][str(args.steps)].items():
        print(f"{name}: log-log slope of RMS vs width at step {args.steps}: {slope:+.3f}")
    print(f"wrote {args.out}/coord_check.json and coord_check.png")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config

    cfg = load_config(args.config, args.overrides)
    from jaxtrain.tools.bench import bench

    print(json.dumps(bench(cfg, args.steps, args.warmup, hlo_out=Path(args.hlo_out) if args.hlo_out else None)))
    return 0


def dry_run_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config

    cfg = load_config(args.config, args.overrides)
    if args.fit and not args.target:
        raise UserError("--fit needs --target NAME: the target whose memory the plan must fit")
    if (args.compile or args.fit) and args.target:
        xla_flags.compile_for_targets()  # before jax starts: the CPU backend only, the targets' compilers
    elif args.compile:
        xla_flags.simulate_cpu_devices(args.devices)  # before jax starts its CPU backend
    from jaxtrain.tools import dry_run

    if args.fit:
        from jaxtrain.tools import fit_plan, targets

        result = fit_plan.fit(cfg, targets.target(args.target))
        print(json.dumps(result) if args.json else fit_plan.format_fit(result))
        return 0
    plan = dry_run.dry_run(cfg, args.devices, args.backend, args.target, compile_step=args.compile,
                           check_memory=not args.skip_memory_check)
    print(json.dumps(plan) if args.json else dry_run.format_plan(plan))
    if args.schedule_png:
        from jaxtrain.tools.plotting import plot_schedule

        plot_schedule(cfg, Path(args.schedule_png))
        if not args.json:
            print(f"wrote {args.schedule_png}")
    return 0
