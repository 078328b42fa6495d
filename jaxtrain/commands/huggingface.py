"""`jaxtrain export` and `jaxtrain import`: Hugging Face model directories out of and into runs
(jaxtrain/huggingface/).

    jaxtrain export WORKDIR --out DIR [--step N] [--dtype float32|bfloat16] [--max-shard-size 5GB]
    jaxtrain import HF_DIR --workdir WORKDIR [--config CONFIG] [--set key=value ...]

`import` makes a jaxtrain workdir whose step-0 checkpoint is the Hugging Face model: the
config's model section is replaced by the directory's architecture, everything else
(data, parametrization, optimizer, schedule) comes from CONFIG (default: jaxtrain's
defaults). It reports the model's validation loss on the run's data at step 0;
`jaxtrain train WORKDIR/config.yaml --workdir WORKDIR` then continues pretraining it, and
`eval`, `generate` and `export` read it like any run. The work is in
jaxtrain/tools/huggingface_export.py and jaxtrain/tools/huggingface_import.py.
"""

from __future__ import annotations

import argparse
import re

from jaxtrain.commands.args import add_process_group, add_set, join_process_group, non_negative_int

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def shard_size(text: str) -> int:
    """`5GB`, `500MiB` or a byte count -> bytes (an argparse `type=`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])


def add_parsers(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face model directory "
                                                "(Llama / Qwen3 / Qwen3-MoE, safetensors, tokenizer)")
    export.add_argument("workdir")
    export.add_argument("--out", required=True, help="new directory to write (must not exist)")
    export.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: newest)")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the exported weights (default float32)")
    export.add_argument("--max-shard-size", type=shard_size, default="5GB", metavar="SIZE",
                        help="larger weights are split into shards with an index (default 5GB)")
    export.set_defaults(func=export_command)
    imported = commands.add_parser("import", help="make a workdir whose step-0 checkpoint is a Hugging Face Llama "
                                                  "/ Qwen3 / Qwen3-MoE model, to evaluate or continue pretraining")
    imported.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors weights")
    imported.add_argument("--workdir", required=True, help="new jaxtrain workdir")
    imported.add_argument("--config", default=None,
                          help="YAML file for everything but the model section (default: jaxtrain's defaults)")
    add_set(imported, "override a config value (repeatable)")
    add_process_group(imported)
    imported.set_defaults(func=import_command)


def export_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.huggingface_export import export_run

    record = export_run(args.workdir, args.out, step=args.step, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    folded = ", ".join(f"{path} x{factor:.6g}" for path, factor in record["folded_factors"].items()) or "none"
    print(f"exported {args.workdir} step {record['source']['step']} as {record['architecture']} "
          f"({args.dtype}) to {args.out}; factors folded into the weights: {folded}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.huggingface_import import plan_import, run_import

    plan = plan_import(args.hf_dir, args.workdir, args.config, args.overrides)
    join_process_group(args)
    result = run_import(plan)
    print(f"imported {args.hf_dir} ({plan.model.config['model_type']}) into {plan.workdir} at step 0: val_loss "
          f"{result.val_loss:.4f} nats/token ({result.val_bits_per_byte:.3f} bits/byte); continue with: "
          f"jaxtrain train {plan.workdir}/config.yaml --workdir {plan.workdir}")
    return 0
