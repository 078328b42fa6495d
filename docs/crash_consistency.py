"""Crash consistency, measured: SIGKILL `jaxtrain train` at random moments many times over,
rerun the same command after every kill, and compare the end with an uninterrupted run.

    .venv/bin/python docs/crash_consistency.py --kills 25 --out /tmp/crash   # ~10 min on 2 cores

The run is configs/tiny.yaml for 120 steps with a row per step and a checkpoint every 5 steps, so kills
land while metrics.jsonl rows and TensorBoard events are appended and while orbax saves.
Kills alternate between three aims: a random moment after start (start-up, compile, steps),
while a checkpoint save is in flight (orbax's temporary directory exists), and just after a
metrics row was appended. After every kill, the read side of the CLI runs on the workdir
the kill left (`plot`, `eval`, `generate`): each must succeed, or refuse in one line
because nothing is saved yet. At the end the killed run's metrics rows (timing fields
aside) and final parameters must equal the uninterrupted run's bit for bit.
Writes OUT/results.json and prints its summary; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 120
SETTINGS = ["--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "checkpoint.every_steps=5"]
TIMING = ("tokens_per_sec", "eta_sec")
NOT_YET = ("has no checkpoints yet", "has no complete checkpoint yet", "no metrics.jsonl rows")


def jaxtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxtrain", *args]


def rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def saving(workdir: Path) -> bool:
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())


def wait_and_kill(proc: subprocess.Popen, workdir: Path, aim: str, rng: random.Random) -> dict:
    """Kill `proc` at the moment `aim` asks for; what the workdir looked like then."""
    deadline = time.time() + 120
    if aim == "random":
        time.sleep(rng.uniform(0.5, 12.0))
    else:
        logged = len(rows(workdir))
        while proc.poll() is None and time.time() < deadline:
            if (aim == "save" and saving(workdir)) or (aim == "row" and len(rows(workdir)) > logged):
                break
            time.sleep(0.001)
    alive = proc.poll() is None
    if alive:
        proc.kill()
    proc.communicate()
    last = rows(workdir)
    return {"aim": aim, "killed": alive, "last_row": last[-1]["step"] if last else None,
            "save_in_flight": saving(workdir)}


def read_side(workdir: Path, out: Path) -> list[str]:
    """The CLI's read-only commands on the workdir a kill left; returns what failed."""
    failures = []
    for args in (["plot", str(workdir), "--out", str(out / "after_kill.png"), "--metric", "loss"],
                 ["eval", str(workdir)],
                 ["generate", str(workdir), "--prompt", "def ", "--max-new-tokens", "8"]):
        done = subprocess.run(jaxtrain(*args), capture_output=True, text=True, cwd=REPO)
        refused_cleanly = done.returncode == 2 and any(n in done.stderr for n in NOT_YET)
        if done.returncode != 0 and not refused_cleanly:
            failures.append(f"{args[0]}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return failures


def params(workdir: Path):
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jaxtrain.tools.saved_run import load_run

    return jax.tree.leaves(jax.device_get(load_run(workdir).params))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    reference, killed = args.out / "reference", args.out / "killed"
    train = lambda workdir: jaxtrain("train", str(REPO / "configs" / "tiny.yaml"), "--workdir", str(workdir),
                                     *SETTINGS)
    if not (reference / "checkpoints" / str(STEPS)).exists():
        subprocess.run(train(reference), check=True, capture_output=True, cwd=REPO)
    started = time.time()
    events, failures, aims = [], [], ("random", "save", "row")
    while sum(e["killed"] for e in events) < args.kills:
        proc = subprocess.Popen(train(killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        event = wait_and_kill(proc, killed, aims[len(events) % len(aims)], rng)
        events.append(event)
        if event["killed"]:
            failures += [f"after kill {len(events)}: {f}" for f in read_side(killed, args.out)]
        elif proc.returncode != 0:
            failures.append(f"run {len(events)} ended with status {proc.returncode}")
        if not event["killed"]:
            break  # the run finished before it could be killed again: compare what there is
    final = subprocess.run(train(killed), capture_output=True, text=True, cwd=REPO)
    if final.returncode != 0:
        failures.append(f"final run: exit {final.returncode}: {final.stderr[-300:]}")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
    same_rows = strip(rows(killed)) == strip(rows(reference))
    same_params = all((a == b).all() for a, b in zip(params(killed), params(reference), strict=True))
    if not same_rows:
        failures.append("metrics rows differ from the uninterrupted run's")
    if not same_params:
        failures.append("final params differ from the uninterrupted run's")
    result = {"kills": sum(e["killed"] for e in events), "kills_by_aim": {a: sum(e["killed"] and e["aim"] == a
                                                                               for e in events) for a in aims},
              "kills_with_a_save_in_flight": sum(e["killed"] and e["save_in_flight"] for e in events),
              "rows_equal": same_rows, "params_bitwise_equal": same_params, "failures": failures,
              "seconds": round(time.time() - started), "events": events}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
