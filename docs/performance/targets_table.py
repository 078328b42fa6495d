"""The markdown table of docs/performance.md "Compiled for real targets", from the
`jaxtrain dry-run --compile --target NAME --json` reports given as arguments."""

import json
import sys
from pathlib import Path

GIB = 2**30
print("| config on target | compiled memory / device (of usable) | estimate | compiled / estimate | "
      "attention kernel | collectives compiled / analytic | roofline step | MFU ceiling |")
print("|---|---|---|---|---|---|---|---|")
for path in map(Path, sys.argv[1:]):
    plan = json.loads(path.read_text())
    c, estimate = plan["compiled"], plan["memory_per_device"]["total"]
    counted, analytic = sum(c["collectives"].values()), sum(plan["communication"]["analytic_by_kind"].values())
    roof = plan["roofline"]
    kinds = ", ".join(f"{k} {v / GIB:.2f}" for k, v in c["collectives"].items() if v)
    print(f"| {path.stem.replace('-', ' on ', 1)} | {c['memory']['total'] / GIB:.1f} GiB (of {c['usable_hbm'] / GIB:.1f}) "
          f"| {estimate / GIB:.1f} GiB | {c['memory']['total'] / estimate:.2f} | {c['attention']['kernel']} "
          f"({c['attention']['custom_calls']} calls) | {counted / GIB:.2f} / {analytic / GIB:.2f} GiB "
          f"({counted / analytic if analytic else float('nan'):.2f}){': ' + kinds if kinds else ''} "
          f"| {roof['step_s'] * 1e3:.0f} ms ({roof['bound']}) | {roof['mfu_ceiling']:.2f} |")
