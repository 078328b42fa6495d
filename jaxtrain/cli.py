"""`jaxtrain <command>`: thin entry points over the library.

    jaxtrain train CONFIG --workdir DIR [--set key.path=value ...]
                   [--coordinator HOST:PORT --num-processes N --process-id I]
    jaxtrain cooldown WORKDIR --step N --decay STEPS|FRACTION --workdir NEW [--shape 1-sqrt]
    jaxtrain schedule CONFIG --out lr.png [--set ...]
    jaxtrain fit-schedule-law RUN... [--predict RUN_OR_CONFIG ...] [--out DIR]
    jaxtrain sweep CONFIG --grid key=v1,v2,... [--grid ...] --out DIR
    jaxtrain coord-check CONFIG --widths 64,128,256 [--depths 2,4] --steps 5 --out DIR
    jaxtrain bench CONFIG [--steps 10 --warmup 2 --hlo-out FILE --set ...]   (one JSON line)
    jaxtrain eval WORKDIR [--data GLOB ...] [--step N]
    jaxtrain generate WORKDIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]
    jaxtrain plot WORKDIR... --out FILE.png [--metric loss,val_loss,lr] [--x step|tokens] [--log-y METRIC,...]
    jaxtrain dry-run CONFIG [--devices N --backend gpu] [--compile] [--target h100|tpu-v5p] [--schedule-png FILE]
    jaxtrain export WORKDIR --out DIR [--step N --dtype float32|bfloat16]   (a Hugging Face model directory)
    jaxtrain import HF_DIR --workdir DIR [--config CONFIG --set ...]        (its step-0 checkpoint)
    jaxtrain data prepare --input PATH_OR_GLOB... --out DIR [--tokenizer byte|bpe:VOCAB|FILE.json]
    jaxtrain data bench DIR --config CONFIG [--seconds S]   (one JSON line)

Bad input (config, data, paths) prints one line `jaxtrain: error: ...` and exits 2;
`JAXTRAIN_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxtrain import xla_flags
from jaxtrain.data import commands as data_commands
from jaxtrain.huggingface import commands as hf_commands
from jaxtrain.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) a run in a workdir")
    train.add_argument("config", help="YAML experiment file, e.g. configs/small.yaml")
    train.add_argument("--workdir", required=True, help="run directory; rerunning on it resumes")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.d_model=512 (repeatable)")
    group = train.add_argument_group("multi-process (jaxtrain/distributed.py; default: SLURM/TPU pod "
                                     "auto-detection, else one process)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, default=None, metavar="N")
    group.add_argument("--process-id", type=int, default=None, metavar="I")
    group.add_argument("--peer-timeout", type=int, default=None, metavar="SECONDS",
                       help="exit with an error when a peer process is silent this long (default 30)")
    train.add_argument("--skip-memory-check", action="store_true",
                       help="train even if the memory estimate exceeds the devices' memory")
    cool = commands.add_parser("cooldown", help="branch a decay phase from a checkpoint of a stable-phase "
                                                "(wsd/constant) run into a new workdir, and train it")
    cool.add_argument("parent", metavar="WORKDIR", help="the stable-phase run (only read)")
    cool.add_argument("--step", type=int, default=None, help="checkpoint to branch from (default: newest)")
    cool.add_argument("--decay", required=True, metavar="STEPS|FRACTION",
                      help="decay length: steps (e.g. 200) or the branch's fraction in decay (e.g. 0.2)")
    cool.add_argument("--workdir", required=True, help="new workdir for the branch (rerunning resumes it)")
    cool.add_argument("--shape", choices=("linear", "cosine", "1-sqrt", "exponential"), default="linear")
    cool.add_argument("--final-lr-fraction", type=float, default=None,
                      help="lr_min as a fraction of the peak (default: the parent's)")
    _add_set(cool)
    sched = commands.add_parser("schedule", help="plot a config's learning-rate schedule to PNG")
    sched.add_argument("config")
    sched.add_argument("--out", required=True, help="PNG file to write")
    _add_set(sched)
    law = commands.add_parser("fit-schedule-law", help="fit L = L0 + A*S1^-alpha - C*S2 to runs; predict "
                                                       "the loss curves of other schedules")
    law.add_argument("runs", nargs="+", metavar="RUN", help="workdirs whose logged training loss is fitted")
    law.add_argument("--predict", nargs="+", default=[], metavar="RUN_OR_CONFIG",
                     help="workdirs (prediction error where they ran) or config files (prediction only)")
    law.add_argument("--out", default=None, help="directory for schedule_law.json and schedule_law.png")
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
    bench.add_argument("--hlo-out", default=None, metavar="FILE",
                       help="write the compiled step's HLO text there (count its collectives with "
                            "jaxtrain.tools.hlo_collectives)")
    _add_set(bench)
    evaluate = commands.add_parser("eval", help="validation loss, perplexity and bits/byte of a checkpoint")
    evaluate.add_argument("workdir")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    evaluate.add_argument("--data", nargs="+", default=None, metavar="GLOB",
                          help="prepared dataset directories, or text files/globs, to evaluate on "
                               "(default: the run's own data); text files are split by the rule of data.paths")
    generate = commands.add_parser("generate", help="sample text from a checkpoint (KV-cached)")
    generate.add_argument("workdir")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200, help="1 to 100,000 (generate.MAX_NEW_TOKENS; default 200)")
    generate.add_argument("--temperature", type=float, default=0.8, help="finite, >= 0; 0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    plot = commands.add_parser("plot", help="overlay the logged curves of several runs in one PNG")
    plot.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--metric", default="loss,val_loss,lr", help="comma-separated metrics.jsonl keys")
    plot.add_argument("--x", choices=("step", "tokens"), default="step")
    plot.add_argument("--log-y", default="", metavar="METRIC,...", help="metrics drawn on a log y axis")
    dry = commands.add_parser("dry-run", help="resolve a config: params by role, shardings, FLOPs, memory, schedule")
    dry.add_argument("config")
    dry.add_argument("--devices", type=int, default=None,
                     help="simulated device count for the mesh (default: this machine's)")
    dry.add_argument("--schedule-png", default=None, metavar="FILE", help="also plot the LR schedule")
    dry.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None,
                     help="platform the run is planned for: sets dtype/attention under auto "
                          "(default: this machine's)")
    dry.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    dry.add_argument("--skip-memory-check", action="store_true",
                     help="print the plan even if it exceeds this machine's memory (planned for its devices)")
    dry.add_argument("--compile", action="store_true",
                     help="also compile the step on --devices simulated CPU devices and count its collectives")
    dry.add_argument("--target", default=None, metavar="NAME",
                     help="roofline of the step on --devices of this accelerator: h100 or tpu-v5p "
                          "(compute vs communication time; jaxtrain/communication.py)")
    _add_set(dry)
    data_commands.add_parser(commands)
    hf_commands.add_parsers(commands)  # export, import: handlers set with set_defaults(func=...)
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run (repeatable)")


def _check_parent_dir(flag: str, path: str) -> None:
    """A file the command will write must have an existing directory to go into."""
    if not Path(path).absolute().parent.is_dir():
        raise UserError(f"{flag} {path}: its directory does not exist")


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

    from jaxtrain.tools.sweep import StopSweep, parse_grid, sweep

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

    from jaxtrain.config_file import load_config
    from jaxtrain.tools.coord_check import coord_check

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
    from pathlib import Path

    from jaxtrain.config_file import load_config

    if args.steps <= 0 or args.warmup < 0:
        raise UserError(f"--steps {args.steps} --warmup {args.warmup}: need steps > 0 and warmup >= 0")
    if args.hlo_out:
        _check_parent_dir("--hlo-out", args.hlo_out)
    cfg = load_config(args.config, args.overrides)
    from jaxtrain.tools.bench import bench

    print(json.dumps(bench(cfg, args.steps, args.warmup, hlo_out=Path(args.hlo_out) if args.hlo_out else None)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from jaxtrain.tools.evaluate_checkpoint import evaluate_run
    from jaxtrain.tools.saved_run import load_run

    report = evaluate_run(load_run(args.workdir, args.step), args.data)
    print(json.dumps(report))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jaxtrain.data.sources import run_tokenizer
    from jaxtrain.tools.generate import check_sampling, generate
    from jaxtrain.tools.saved_run import load_run

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.prompt)
    run = load_run(args.workdir, args.step)
    tokenizer = run_tokenizer(run.cfg)
    prompt = tokenizer.encode_documents([args.prompt.encode("utf-8")])[0].astype("int32")
    tokens = generate(run.model(), prompt[None], max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(tokens[0]))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxtrain.metrics import read_metrics
    from jaxtrain.tools.plotting import plot_runs

    metrics = [m for m in args.metric.split(",") if m]
    runs = {}
    for workdir in args.workdirs:
        rows = read_metrics(Path(workdir) / "metrics.jsonl")
        if not rows:
            raise UserError(f"{workdir}: no metrics.jsonl rows (not a jaxtrain workdir, or no step logged yet)")
        runs[Path(workdir).name if Path(workdir).name not in runs else workdir] = rows
    for metric in metrics:
        if not any(metric in row for rows in runs.values() for row in rows):
            raise UserError(f"--metric {metric}: not logged by any of the runs")
    _check_parent_dir("--out", args.out)
    plot_runs(runs, metrics, args.x, Path(args.out), log_y=set(args.log_y.split(",")))
    print(f"wrote {args.out}")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    import json

    from jaxtrain.config_file import load_config

    cfg = load_config(args.config, args.overrides)
    if args.devices is not None and args.devices <= 0:
        raise UserError(f"--devices {args.devices}: must be positive")
    if args.compile:
        xla_flags.simulate_cpu_devices(args.devices)
    import jax

    from jaxtrain.tools import dry_run
    from jaxtrain.tools.communication import TARGETS

    if args.target is not None and args.target not in TARGETS:
        raise UserError(f"--target {args.target}: not one of {', '.join(sorted(TARGETS))}")
    devices = args.devices or jax.device_count()
    compiled_on = None
    if args.compile:
        compiled_on = jax.devices("cpu")[:devices]
        if len(compiled_on) < devices:
            raise UserError(f"--compile --devices {devices}: this process has {len(compiled_on)} CPU devices "
                            f"(its XLA_FLAGS fix --xla_force_host_platform_device_count)")
    plan = dry_run.plan(cfg, devices, backend="cpu" if args.compile else args.backend or jax.default_backend(),
                        target=args.target, compiled_on=compiled_on)
    if args.devices is None and args.backend is None and not args.skip_memory_check:  # a plan for this machine
        from jaxtrain.memory import check_estimate

        check_estimate(plan["memory_per_device"], jax.local_devices())  # as `jaxtrain train` would
    print(json.dumps(plan) if args.json else dry_run.format_plan(plan))
    if args.schedule_png:
        from pathlib import Path

        from jaxtrain.tools.plotting import plot_schedule

        plot_schedule(cfg, Path(args.schedule_png))
        if not args.json:
            print(f"wrote {args.schedule_png}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from jaxtrain.config_file import load_config

    from jaxtrain import distributed

    cfg = load_config(args.config, args.overrides)
    group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
    distributed.initialize(group, args.peer_timeout or distributed.DEFAULT_PEER_TIMEOUT)
    return _run_and_report(cfg, args.workdir, check_memory=not args.skip_memory_check)


def _run_and_report(cfg, workdir: str, check_memory: bool = True) -> int:
    from jaxtrain.train import run

    result = run(cfg, workdir, check_memory=check_memory)
    if result.stop_signal is not None:
        print(f"jaxtrain: stopped by signal {result.stop_signal} after step {result.step}; "
              f"rerun the same command to resume", file=sys.stderr)
        return 128 + result.stop_signal
    import jax

    if jax.process_index() == 0:  # the result is the same on every process; say it once
        print(f"final val_loss {result.val_loss:.4f} nats/token ({result.val_bits_per_byte:.3f} bits/byte) "
              f"at step {result.step}; unigram entropy of the training data {result.unigram_entropy:.4f} nats/token")
    return 0


def _cooldown(args: argparse.Namespace) -> int:
    from jaxtrain.tools.cooldown import create_branch

    cfg, lineage = create_branch(args.parent, args.step, args.decay, args.workdir, args.shape,
                                 args.final_lr_fraction, args.overrides)
    print(f"cooldown branch of {lineage['parent']} at step {lineage['step']}: {lineage['decay_steps']} "
          f"{lineage['decay_shape']} decay steps to {lineage['final_lr_fraction']:g} x peak, in {args.workdir}")
    return _run_and_report(cfg, args.workdir)


def _fit_schedule_law(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from jaxtrain.tools.plotting import plot_schedule_law
    from jaxtrain.tools.schedule_law import fit_and_predict

    report = fit_and_predict(args.runs, args.predict)
    law = report["law"]
    print(f"L = {law['L0']:.4f} + {law['A']:.4f} * S1^-{law['alpha']:.4f} - {law['C']:.4f} * S2 "
          f"(fitted on {len(args.runs)} run(s))")
    for kind in ("fitted", "predicted"):
        for r in report[kind]:
            line = f"{kind:<9} {r['run']}: final loss predicted {r['predicted_final_loss']:.4f}"
            if "mean_abs_error" in r:
                line += (f", logged {r['logged_final_loss']:.4f} vs law {r['predicted_tail_loss']:.4f} "
                         f"(error {r['final_error']:+.4f}); curve mean |error| {r['mean_abs_error']:.4f}, "
                         f"max {r['max_abs_error']:.4f}")
            print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "schedule_law.json").write_text(json.dumps(report, indent=1))
        plot_schedule_law(report, out / "schedule_law.png")
        print(f"wrote {out / 'schedule_law.json'} and {out / 'schedule_law.png'}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxtrain.config_file import load_config
    from jaxtrain.tools.plotting import plot_schedule

    cfg = load_config(args.config, args.overrides)
    _check_parent_dir("--out", args.out)
    plot_schedule(cfg, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    xla_flags.tune_cpu_xla()
    args = _parser().parse_args(argv)
    try:
        handler = getattr(args, "func", None) or {
            "train": _train, "cooldown": _cooldown, "schedule": _schedule, "fit-schedule-law": _fit_schedule_law,
            "sweep": _sweep, "coord-check": _coord_check, "bench": _bench, "eval": _eval, "generate": _generate,
            "plot": _plot, "dry-run": _dry_run, "data": data_commands.run}[args.command]
        return handler(args)
    except UserError as err:
        if os.environ.get("JAXTRAIN_DEBUG"):
            raise
        print(f"jaxtrain: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
