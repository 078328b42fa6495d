"""Optional Weights & Biases logging: never needed, a clear error when asked for without
the package, and every metrics.jsonl row forwarded when it is there.

The tests run offline: the second test puts a recording stand-in for the `wandb` package
on PYTHONPATH (the W&B service is outside this project; what is tested is that the
training loop calls the documented `wandb.init / log / finish` API with its rows).
"""

import importlib.util
import json
import os

import pytest

from conftest import TINY, run_cli
from jaxtrain.run.metrics import TIMING_KEYS, read_metrics

pytestmark = pytest.mark.slow

RECORDER = '''
import json, os
_path = os.environ["WANDB_RECORD"]
def _write(entry):
    with open(_path, "a") as f:
        f.write(json.dumps(entry) + "\\n")
class _Run:
    def log(self, row, step):
        _write({"log": row, "step": step})
    def finish(self):
        _write({"finish": True})
def init(**kwargs):
    _write({"init": {k: kwargs[k] for k in ("project", "name", "id", "resume")}})
    return _Run()
'''


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", str(TINY), "--workdir", str(workdir), "--set", "train.wandb_project=demo")
    assert result.returncode == 2
    assert result.stderr.strip() == ("jaxtrain: error: config key 'train.wandb_project': 'demo' needs the wandb "
                                     "package (pip install wandb), which is not installed")
    assert not workdir.exists()


def test_every_logged_row_reaches_wandb(tmp_path):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "__init__.py").write_text(RECORDER)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "WANDB_RECORD": str(record)}
    workdir = tmp_path / "run"
    result = run_cli("train", str(TINY), "--workdir", str(workdir), "--set", "train.wandb_project=demo",
                     "--set", "train.steps=10", env=env)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert entries[0]["init"]["project"] == "demo" and entries[0]["init"]["resume"] == "allow"
    assert entries[-1] == {"finish": True}
    logged = [(e["step"], e["log"]) for e in entries if "log" in e]
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [step for step, _ in logged] == [row["step"] for row in rows] == [5, 10]
    for (_, sent), row in zip(logged, rows, strict=True):
        assert {k: v for k, v in sent.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in row.items() if k not in TIMING_KEYS and k != "step"}
