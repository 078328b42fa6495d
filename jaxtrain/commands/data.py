"""`jaxtrain data prepare` and `jaxtrain data bench`: make token stores, time the input pipeline.

    jaxtrain data prepare --input PATH_OR_GLOB... --out DIR [--tokenizer byte | bpe:VOCAB | FILE.json]
                          [--val-fraction F] [--name NAME] [--token-dtype auto|uint8|uint16|uint32]
                          [--text-field NAME] [--id-field NAME] [--strict] [--tokenizer-sample BYTES]
                          [--workers N] [--engine local|ray] [--ray-address ADDR]
    jaxtrain data bench DIR --config CONFIG [--seconds S] [--no-train] [--set ...]   (one JSON line)
    jaxtrain data make-tasks --out DIR [--input PATH_OR_GLOB...] [--val-fraction F] [--questions N]
                             [--documents N] [--seed S]   (evaluation tasks from held-out files)
"""

from __future__ import annotations

import argparse
import json
import os
import re

from jaxtrain.commands.args import add_set, open_fraction, positive_float, positive_int

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """BYTES, or a number with K, M, G or T (powers of 1024, an optional "iB" or "B")."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, e.g. 1073741824 or 1G, not {text!r}")
    return int(match[1]) * _UNITS[match[2].upper()]


def add_parsers(commands) -> None:
    data = commands.add_parser("data", help="prepare token stores; benchmark the input pipeline")
    sub = data.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prepare",
                          help="tokenize text, jsonl(.gz/.zst), parquet or saved datasets once into a token store")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                      help="files, directories or globs ('{stdlib}/**/*.py' = the Python standard library)")
    prep.add_argument("--out", required=True, help="dataset directory to create (must not exist)")
    prep.add_argument("--tokenizer", default="byte", metavar="byte|bpe:VOCAB|FILE.json",
                      help="raw bytes, a byte-level BPE of VOCAB ids trained here, or a tokenizers JSON file")
    prep.add_argument("--val-fraction", type=open_fraction, default=0.05, help="fraction of documents held out")
    prep.add_argument("--name", default=None, help="dataset name (default: the --out directory's name)")
    prep.add_argument("--token-dtype", default="auto", choices=("auto", "uint8", "uint16", "uint32"),
                      help="auto: the smallest that fits the vocabulary")
    prep.add_argument("--text-field", default="text", metavar="NAME",
                      help="jsonl / parquet / Arrow: the field holding a document's text (default: text)")
    prep.add_argument("--id-field", default=None, metavar="NAME",
                      help="the field whose value the train/val split hashes (default: FILE#ROW)")
    prep.add_argument("--strict", action="store_true",
                      help="stop at the first bad record (default: skip bad records and count them per reason)")
    prep.add_argument("--tokenizer-sample", type=byte_size, default="1G", metavar="BYTES",
                      help="train a BPE on at most this many bytes of training documents, chosen by hash (default 1G)")
    prep.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                      help="processes tokenizing in parallel (default: every core); the store is the same for any N")
    prep.add_argument("--engine", default="local", choices=("local", "ray"),
                      help="local: a process pool; ray: Ray tasks (pip install 'jaxtrain[distributed]')")
    prep.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="with --engine ray: a running cluster (auto, or HOST:PORT; default RAY_ADDRESS, else a "
                           "local instance); --out must be on a file system every node mounts")
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

    metadata = prepare(args.input, args.out, args.tokenizer, args.val_fraction, args.name, args.token_dtype,
                       text_field=args.text_field, id_field=args.id_field, strict=args.strict, workers=args.workers,
                       engine=args.engine, ray_address=args.ray_address, tokenizer_sample=args.tokenizer_sample)
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
