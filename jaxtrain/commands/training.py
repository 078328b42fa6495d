"""`jaxtrain train` and `jaxtrain cooldown`: the commands that train (both join the process
group, so either runs as one of several processes).

    jaxtrain train CONFIG --workdir DIR [--set key.path=value ...]
                   [--coordinator HOST:PORT --num-processes N --process-id I]
    jaxtrain cooldown WORKDIR --step N --decay STEPS|FRACTION --workdir NEW [--shape 1-sqrt]
"""

from __future__ import annotations

import argparse
import sys

from jaxtrain.commands.args import (add_process_group, add_set, fraction_in_unit_interval, join_process_group,
                                    non_negative_int, steps_or_fraction)


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="train (or resume) a run in a workdir")
    train.add_argument("config", help="YAML experiment file, e.g. configs/small.yaml")
    train.add_argument("--workdir", required=True, help="run directory; rerunning on it resumes")
    add_set(train, "override a config value, e.g. --set model.d_model=512 (repeatable)")
    add_process_group(train)
    train.add_argument("--skip-memory-check", action="store_true",
                       help="train even if the memory estimate exceeds the devices' memory")
    train.set_defaults(func=train_command)

    cool = commands.add_parser("cooldown", help="branch a decay phase from a checkpoint of a stable-phase "
                                                "(wsd/constant) run into a new workdir, and train it")
    cool.add_argument("parent", metavar="WORKDIR", help="the stable-phase run (only read)")
    cool.add_argument("--step", type=non_negative_int, default=None,
                      help="checkpoint to branch from (default: newest)")
    cool.add_argument("--decay", required=True, type=steps_or_fraction, metavar="STEPS|FRACTION",
                      help="decay length: steps (e.g. 200) or the branch's fraction in decay (e.g. 0.2)")
    cool.add_argument("--workdir", required=True, help="new workdir for the branch (rerunning resumes it)")
    cool.add_argument("--shape", choices=("linear", "cosine", "1-sqrt", "exponential"), default="linear")
    cool.add_argument("--final-lr-fraction", type=fraction_in_unit_interval, default=None,
                      help="lr_min as a fraction of the peak (default: the parent's)")
    add_set(cool)
    add_process_group(cool)
    cool.set_defaults(func=cooldown_command)


def train_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config

    cfg = load_config(args.config, args.overrides)
    join_process_group(args)
    return run_and_report(cfg, args.workdir, check_memory=not args.skip_memory_check)


def cooldown_command(args: argparse.Namespace) -> int:
    from jaxtrain.tools.cooldown import create_branch

    join_process_group(args)
    cfg, lineage = create_branch(args.parent, args.step, args.decay, args.workdir, args.shape,
                                 args.final_lr_fraction, args.overrides)
    print(f"cooldown branch of {lineage['parent']} at step {lineage['step']}: {lineage['decay_steps']} "
          f"{lineage['decay_shape']} decay steps to {lineage['final_lr_fraction']:g} x peak, in {args.workdir}")
    return run_and_report(cfg, args.workdir, command="cooldown")


def run_and_report(cfg, workdir: str, check_memory: bool = True, command: str = "train") -> int:
    """Train; a signal stop exits 128 + signal (rerun resumes), else print the final figures."""
    from jaxtrain.run.loop import run

    result = run(cfg, workdir, check_memory=check_memory, command=command)
    if result.stop_signal is not None:
        print(f"jaxtrain: stopped by signal {result.stop_signal} after step {result.step}; "
              f"rerun the same command to resume", file=sys.stderr)
        return 128 + result.stop_signal
    import jax

    if jax.process_index() == 0:  # the result is the same on every process; say it once
        print(f"final val_loss {result.val_loss:.4f} nats/token ({result.val_bits_per_byte:.3f} bits/byte) "
              f"at step {result.val_step}; unigram entropy of the training data {result.unigram_entropy:.4f} nats/token")
    return 0
