"""`jaxtrain schedule` and `jaxtrain fit-schedule-law`: look at learning-rate schedules and
predict their loss curves.

    jaxtrain schedule CONFIG --out lr.png [--set ...]
    jaxtrain fit-schedule-law RUN... [--predict RUN_OR_CONFIG ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxtrain.commands.args import add_set, file_to_write


def add_parsers(commands) -> None:
    sched = commands.add_parser("schedule", help="plot a config's learning-rate schedule to PNG")
    sched.add_argument("config")
    sched.add_argument("--out", required=True, type=file_to_write, help="PNG file to write")
    add_set(sched)
    sched.set_defaults(func=schedule_command)

    law = commands.add_parser("fit-schedule-law", help="fit L = L0 + A*S1^-alpha - C*S2 to runs; predict "
                                                       "the loss curves of other schedules")
    law.add_argument("runs", nargs="+", metavar="RUN", help="workdirs whose logged training loss is fitted")
    law.add_argument("--predict", nargs="+", default=[], metavar="RUN_OR_CONFIG",
                     help="workdirs (prediction error where they ran) or config files (prediction only)")
    law.add_argument("--out", default=None, help="directory for schedule_law.json and schedule_law.png")
    law.set_defaults(func=fit_schedule_law_command)


def schedule_command(args: argparse.Namespace) -> int:
    from jaxtrain.config.files import load_config
    from jaxtrain.tools.plotting import plot_schedule

    plot_schedule(load_config(args.config, args.overrides), Path(args.out))
    print(f"wrote {args.out}")
    return 0


def fit_schedule_law_command(args: argparse.Namespace) -> int:
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
