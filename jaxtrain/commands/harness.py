"""`jaxtrain lm-eval ARGS...`: lm-evaluation-harness's own command line with the model type
`jaxtrain` registered (jaxtrain/tools/harness.py), every lm-eval flag unchanged.

    jaxtrain lm-eval --model jaxtrain --model_args workdir=runs/small[,step=N] \
        --tasks hellaswag --batch_size 32 [--output_path DIR --limit N ...]
    jaxtrain lm-eval ls tasks                  # any lm-eval subcommand

lm-eval 0.4 resolves `--model NAME` only from its in-process registry (no entry points), so
the bare `lm_eval --model jaxtrain` cannot find a model another package defines: this
command imports the model module (its `@register_model("jaxtrain")` registers it) and
hands ARGS to lm-eval's entry point (`lm_eval.__main__.cli_evaluate`, the `lm_eval`
console script) as its argv. Nothing here parses ARGS: `--help` is lm-eval's help.
"""

from __future__ import annotations

import argparse
import sys

from jaxtrain.config.errors import UserError

INSTALL = "pip install 'jaxtrain[harness]' (lm-eval with its hf backend)"


def add_parsers(commands) -> None:
    # prefix_chars no flag uses: every argument, --help included, is lm-eval's
    harness = commands.add_parser("lm-eval", help="lm-evaluation-harness with --model jaxtrain (lm-eval's flags)",
                                  add_help=False, prefix_chars="\0")
    harness.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    harness.set_defaults(func=lm_eval_command)


def lm_eval_command(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise UserError(f"jaxtrain lm-eval needs lm-evaluation-harness ({err}): {INSTALL}") from None
    import jaxtrain.tools.harness  # noqa: F401 - registers --model jaxtrain

    argv = sys.argv
    sys.argv = ["lm-eval", *args.args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
