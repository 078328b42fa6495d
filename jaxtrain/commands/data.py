"""`jaxtrain data prepare` and `jaxtrain data bench`: make token stores, time the input pipeline.

    jaxtrain data prepare --input PATH_OR_GLOB... --out DIR [--tokenizer byte | bpe:VOCAB | FILE.json]
                          [--val-fraction F] [--name NAME] [--token-dtype auto|uint8|uint16|uint32]
    jaxtrain data bench DIR --config CONFIG [--seconds S] [--no-train] [--set ...]   (one JSON line)
    jaxtrain data make-tasks --out DIR [--input PATH_OR_GLOB...] [--val-fraction F] [--questions N]
                             [--documents N] [--seed S]   (evaluation tasks from held-out files)
"""

from __future__ import annotations

import argparse
import json

from jaxtrain.commands.args import add_set, open_fraction, positive_float, positive_int


def add_parsers(commands) -> None:
    data = commands.add_parser("data", help="prepare token stores; benchmark the input pipeline")
    sub = data.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files once into a token store")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                      help="files, directories or globs ('{stdlib}/**/*.py' = the Python standard library)")
    prep.add_argument("--out", required=True, help="dataset directory to create (must not exist)")
    prep.add_argument("--tokenizer", default="byte", metavar="byte|bpe:VOCAB|FILE.json",
                      help="raw bytes, a byte-level BPE of VOCAB ids trained here, or a tokenizers JSON file")
    prep.add_argument("--val-fraction", type=open_fraction, default=0.05, help="fraction of documents held out")
    prep.add_argument("--name", default=None, help="dataset name (default: the --out directory's name)")
    prep.add_argument("--token-dtype", default="auto", choices=("auto", "uint8", "uint16", "uint32"),
                      help="auto: the smallest that fits the vocabulary")
    bench = sub.add_parser("bench", help="pipeline tokens/s and memory, next to the train step's tokens/s")
    bench.add_argument("dataset", metavar="DIR", help="a prepared dataset")
    bench.add_argument("--config", required=True, help="the run's config (seq_len, batch size, model)")
    bench.add_argument("--seconds", type=positive_float, default=20.0, help="how long to drain the pipeline")
    bench.add_argument("--no-train", action="store_true", help="skip timing the train step")
    add_set(bench, "override a config value (repeatable)")
    tasks = sub.add_parser("make-tasks", help="evaluation tasks (next-line multiple choice, held-out text) "
                                              "from the validation files of a text corpus")
    tasks.add_argument("--out", required=True, help="directory to write the task files into")
    tasks.add_argument("--input", nargs="+", default=["{stdlib}/**/*.py"], metavar="PATH_OR_GLOB",
                       help="the run's data.paths (default: the standard library)")
    tasks.add_argument("--val-fraction", type=open_fraction, default=0.05, help="the run's data.val_fraction")
    tasks.add_argument("--questions", type=positive_int, default=200, help="multiple-choice questions")
    tasks.add_argument("--documents", type=positive_int, default=24, help="held-out documents")
    tasks.add_argument("--seed", type=int, default=0)
    prep.set_defaults(func=prepare_command)
    bench.set_defaults(func=bench_command)
    tasks.set_defaults(func=make_tasks_command)


def prepare_command(args: argparse.Namespace) -> int:
    from jaxtrain.data.prepare import prepare, summary

    metadata = prepare(args.input, args.out, args.tokenizer, args.val_fraction, args.name, args.token_dtype)
    print(summary(metadata, args.out))
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config
    from jaxtrain.tools.data_bench import bench_data

    cfg = load_config(args.config, [*args.overrides, f"data.sources=[{{path: '{args.dataset}'}}]"])
    print(json.dumps(bench_data(cfg, args.seconds, train=not args.no_train)))
    return 0


def make_tasks_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.make_task import make_tasks

    print(json.dumps(make_tasks(args.out, tuple(args.input), args.val_fraction, args.questions, args.documents,
                                args.seed)))
    return 0
