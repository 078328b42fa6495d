"""The markdown table of docs/moe.md "Expert parallelism", from the
`jaxtrain dry-run --compile --target NAME --json` reports of a MoE config given as arguments:
per device, the compiled memory against the estimate and the all-to-all bytes of the target
HLO against the analytic model (tools/communication.py)."""

import json
import sys
from pathlib import Path

GIB = 2**30
print("| plan | mesh | compiled memory / device (of usable) | estimate | all-to-all per step: HLO / analytic "
      "| all collectives: HLO / analytic | roofline step |")
print("|---|---|---|---|---|---|---|")
for path in map(Path, sys.argv[1:]):
    plan = json.loads(path.read_text())
    c, estimate, analytic = plan["compiled"], plan["memory_per_device"]["total"], plan["communication"]["analytic_by_kind"]
    mesh = " x ".join(f"{axis} {size}" for axis, size in plan["mesh"].items() if size > 1)
    a2a, a2a_model = c["collectives"]["all-to-all"], analytic["all-to-all"]
    total, total_model = sum(c["collectives"].values()), sum(analytic.values())
    roof = plan["roofline"]
    print(f"| {path.stem} | {mesh} | {c['memory']['total'] / GIB:.1f} GiB (of {c['usable_hbm'] / GIB:.1f}) | "
          f"{estimate / GIB:.1f} GiB ({c['memory']['total'] / estimate:.2f}) | {a2a / GIB:.2f} / {a2a_model / GIB:.2f} GiB "
          f"({a2a / a2a_model:.3f}) | {total / GIB:.2f} / {total_model / GIB:.2f} GiB ({total / total_model:.2f}) | "
          f"{roof['step_s'] * 1e3:.0f} ms ({roof['bound']}, compute {roof['compute_s'] * 1e3:.0f} ms) |")
