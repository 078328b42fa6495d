"""Commands that read saved runs (nothing in a workdir is written).

    jaxtrain eval WORKDIR [--data GLOB ...] [--step N]
    jaxtrain eval WORKDIR [--step N] [--tasks [NAME ...]] [--text FILE ...]
    jaxtrain generate WORKDIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]
    jaxtrain plot WORKDIR... --out FILE.png [--metric loss,val_loss,lr,'eval/*'] [--x step|tokens] [--log-y METRIC,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxtrain.commands.args import file_to_write, int_up_to, non_negative_float, non_negative_int, utf8_text
from jaxtrain.config.errors import UserError

# The most tokens one `jaxtrain generate` samples: its KV cache holds every position at
# once and the loop is one compiled scan, so a bound far above any model's context stops a
# typo (1000000000) from exhausting memory first.
MAX_NEW_TOKENS = 100_000


def add_parsers(commands) -> None:
    evaluate = commands.add_parser("eval", help="validation loss, perplexity and bits/byte of a checkpoint")
    evaluate.add_argument("workdir")
    evaluate.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: newest)")
    evaluate.add_argument("--data", nargs="+", default=None, metavar="GLOB",
                          help="prepared dataset directories, or text files/globs, to evaluate on "
                               "(default: the run's own data); text files are split by the rule of data.paths")
    evaluate.add_argument("--tasks", nargs="*", default=None, metavar="NAME",
                          help="score the config's eval.tasks (all, or those named) instead of the validation loss")
    evaluate.add_argument("--text", nargs="+", default=(), metavar="FILE",
                          help="bits per byte of these text files / globs / jsonl files ({\"text\": ...} lines), "
                               "as task 'text'")
    evaluate.set_defaults(func=eval_command)

    generate = commands.add_parser("generate", help="sample text from a checkpoint (KV-cached)")
    generate.add_argument("workdir")
    generate.add_argument("--prompt", required=True, type=utf8_text)
    generate.add_argument("--max-new-tokens", type=int_up_to(MAX_NEW_TOKENS), default=200,
                          help=f"1 to {MAX_NEW_TOKENS:,} (default 200)")
    generate.add_argument("--temperature", type=non_negative_float, default=0.8,
                          help="finite, >= 0; 0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=non_negative_int, default=0,
                          help="sample among the k most likely (0 = all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: newest)")
    generate.set_defaults(func=generate_command)

    plot = commands.add_parser("plot", help="overlay the logged curves of several runs in one PNG")
    plot.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    plot.add_argument("--out", required=True, type=file_to_write, help="PNG file to write")
    plot.add_argument("--metric", default="loss,val_loss,lr",
                      help="comma-separated metrics.jsonl keys; a glob names every key it matches ('eval/*')")
    plot.add_argument("--x", choices=("step", "tokens"), default="step")
    plot.add_argument("--log-y", default="", metavar="METRIC,...", help="metrics drawn on a log y axis")
    plot.set_defaults(func=plot_command)


def eval_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.evaluate_checkpoint import evaluate_run, evaluate_tasks
    from jaxtrain.tools.saved_run import load_run

    scoring = args.tasks is not None or bool(args.text)
    if scoring and args.data:
        raise UserError("--data (validation loss) and --tasks / --text (task scores) are separate evaluations")
    run = load_run(args.workdir, args.step)
    if scoring:  # bare --tasks: all the config's tasks; no --tasks: none of them
        names = [] if args.tasks is None else (args.tasks or None)
        print(json.dumps(evaluate_tasks(run, names, tuple(args.text))))
    else:
        print(json.dumps(evaluate_run(run, args.data)))
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from jaxtrain.data.sources import run_tokenizer
    from jaxtrain.data.tokenizer import encode_text
    from jaxtrain.tools.generate import generate
    from jaxtrain.tools.saved_run import load_run

    run = load_run(args.workdir, args.step)
    tokenizer = run_tokenizer(run.cfg)
    prompt = encode_text(tokenizer, args.prompt)
    tokens = generate(run.model(), prompt[None], max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(tokens[0]))
    return 0


def plot_command(args: argparse.Namespace) -> int:
    from jaxtrain.run.metrics import read_metrics
    from jaxtrain.run.workdir import Layout
    from jaxtrain.tools.plotting import plot_runs

    metrics = [m for m in args.metric.split(",") if m]
    runs = {}
    for workdir in args.workdirs:
        rows = read_metrics(Layout(Path(workdir)).metrics)
        if not rows:
            raise UserError(f"{workdir}: no metrics.jsonl rows (not a jaxtrain workdir, or no step logged yet)")
        runs[Path(workdir).name if Path(workdir).name not in runs else workdir] = rows
    logged = list(dict.fromkeys(key for rows in runs.values() for row in rows for key in row))
    metrics = [m for pattern in metrics for m in _matching(pattern, logged)]
    plot_runs(runs, metrics, args.x, Path(args.out), log_y=set(args.log_y.split(",")))
    print(f"wrote {args.out}")
    return 0


def _matching(pattern: str, logged: list[str]) -> list[str]:
    """The logged keys a --metric item names: itself, or those its glob matches, in logged order."""
    import fnmatch

    found = [key for key in logged if fnmatch.fnmatchcase(key, pattern)] if any(c in pattern for c in "*?[") else (
        [pattern] if pattern in logged else [])
    if not found:
        raise UserError(f"--metric {pattern}: not logged by any of the runs")
    return found
