"""Bad input, as a new user gives it: one line naming the culprit, exit 2, and a saved
workdir byte-identical afterwards. One table of (command, exit status, the word the message
must name); the cases that need a damaged workdir or another user follow it."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, cli_in_process
from jaxtrain.run.metrics import read_metrics
from jaxtrain.run.workdir import Layout
from jaxtrain.tools import coord_check

pytestmark = pytest.mark.slow

HUGE = "model.d_model=16384"  # ~98 GB per device by the dry-run estimate: more than any CI machine


def snapshot(directory):
    """Every file of the run; not the lock file, which records the newest process that owned
    the workdir (a refused resume owned it while it checked)."""
    return {p.relative_to(directory): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".owner"}


@pytest.fixture(scope="module")
def saved(cli_reference, tmp_path_factory):
    """A copy of the reference run (40 steps, checkpoints 20, 30, 40) to be refused on."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    shutil.copytree(cli_reference, workdir)
    return workdir


def _files(tmp):
    (tmp / "empty.yaml").write_text("")
    (tmp / "twice.yaml").write_text("model:\n  d_model: 64\n  d_model: 128\n")
    (tmp / "list.yaml").write_text("- model\n")


CASES = {  # name: (argv with {saved} / {tmp} / {tiny}, exit status, word the one line names)
    "empty config file": (["train", "{tmp}/empty.yaml", "--workdir", "{tmp}/new"], 2, "empty.yaml: is empty"),
    "key given twice": (["train", "{tmp}/twice.yaml", "--workdir", "{tmp}/new"], 2, "'d_model' is given twice"),
    "config file is a list": (["dry-run", "{tmp}/list.yaml"], 2, "list.yaml: the top level must be a mapping"),
    "missing config file": (["train", "{tmp}/none.yaml", "--workdir", "{tmp}/new"], 2, "config file"),
    "lr=inf": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "optimizer.lr=.inf"], 2, "optimizer.lr"),
    "lr=nan": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "optimizer.lr=.nan"], 2, "optimizer.lr"),
    "kv heads exceed heads": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "model.n_kv_heads=8"],
                              2, "n_kv_heads=8 exceeds n_heads=4"),
    "model too big for memory": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", HUGE], 2, "per device"),
    "absurd width": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "model.d_model=1000000000",
                      "--set", "model.n_heads=1", "--set", "model.n_kv_heads=1"], 2, "per device"),
    "dry-run: batch vs mesh": (["dry-run", "{tiny}", "--devices", "8", "--set", "train.batch_size=12"],
                               2, "train.batch_size"),
    "dry-run: absurd device count": (["dry-run", "{tiny}", "--devices", "1000000000000"], 2, "train.batch_size"),
    "dry-run: no devices": (["dry-run", "{tiny}", "--devices", "0"], 2, "--devices 0"),
    "dry-run: memory of this machine": (["dry-run", "{tiny}", "--set", HUGE], 2, "per device"),
    "dry-run: microbatches": (["dry-run", "{tiny}", "--devices", "8", "--set", "train.microbatches=3"],
                              2, "train.microbatches"),
    "generate: too many tokens": (["generate", "{saved}", "--prompt", "a", "--max-new-tokens", "1000000000"],
                                  2, "--max-new-tokens"),
    "generate: prompt not UTF-8": (["generate", "{saved}", "--prompt", "ab\udcff"], 2, "not valid UTF-8"),
    "generate: temperature nan": (["generate", "{saved}", "--prompt", "a", "--temperature", "nan"],
                                  2, "--temperature nan"),
    "generate: empty prompt": (["generate", "{saved}", "--prompt", ""], 2, "--prompt '': must contain"),
    "data prepare: val fraction 1": (["data", "prepare", "--input", "{tiny}", "--out", "{tmp}/store",
                                      "--val-fraction", "1"], 2, "--val-fraction 1: must be a number strictly"),
    "data prepare: token dtype": (["data", "prepare", "--input", "{tiny}", "--out", "{tmp}/store",
                                   "--token-dtype", "int8"], 2, "--token-dtype invalid choice: 'int8'"),
    "plot into a missing directory": (["plot", "{saved}", "--out", "{tmp}/missing/curves.png"], 2, "--out"),
    "eval on missing data": (["eval", "{saved}", "--data", "{tmp}/missing"], 2, "--data"),
    "sweep's default x not swept": (["sweep", "{tiny}", "--grid", "model.d_model=32,64", "--out", "{tmp}/sweep"],
                                    2, "--x optimizer.lr (the default)"),
    "resume with another model": (["train", "{tiny}", "--workdir", "{saved}", "--set", "model.d_model=32"],
                                  2, "model.d_model"),
    "resume with another optimizer": (["train", "{tiny}", "--workdir", "{saved}", "--set", "optimizer.name=muon"],
                                      2, "optimizer.name"),
    "eval of a missing step": (["eval", "{saved}", "--step", "7"], 2, "--step 7"),
    # the README's earlier promises, in the same table
    "unknown key": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "model.width=3"], 2, "model.width"),
    "heads do not divide width": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "model.n_heads=3"],
                                  2, "model.n_heads"),
    "mesh vs devices": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "mesh.tensor=3"], 2, "mesh"),
    "train: batch vs mesh": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "train.batch_size=12"],
                             2, "train.batch_size"),
    "no data files": (["train", "{tiny}", "--workdir", "{tmp}/new", "--set", "data.paths=[/nothing/*.py]"],
                      2, "data.paths"),
    "eval of a non-workdir": (["eval", "{tmp}"], 2, "not a jaxtrain workdir"),
    "generate from a non-workdir": (["generate", "{tmp}", "--prompt", "a"], 2, "not a jaxtrain workdir"),
    "schedule into a missing directory": (["schedule", "{tiny}", "--out", "{tmp}/missing/lr.png"], 2, "--out"),
    "cooldown from a missing step": (["cooldown", "{saved}", "--step", "7", "--decay", "5",
                                      "--workdir", "{tmp}/branch"], 2, "--step 7"),
    "export over an existing directory": (["export", "{saved}", "--out", "{tmp}"], 2, "already exists"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, saved, tmp_path, capsys):
    argv, status, word = CASES[name]
    _files(tmp_path)
    before, listing = snapshot(saved), sorted(p.name for p in tmp_path.iterdir())
    fill = {"saved": str(saved), "tmp": str(tmp_path), "tiny": str(TINY)}
    got, _, err = cli_in_process(capsys, *[a.format(**fill) for a in argv])
    assert got == status and word in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jaxtrain: error: "), err
    assert "config key '/" not in err  # a file is named as a file, not as a config key
    assert snapshot(saved) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no workdir, no output created


def test_coord_check_refuses_the_whole_request_before_training_any_width(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(coord_check, "_trace", lambda *a: pytest.fail("trained a width before validating all"))
    status, _, err = cli_in_process(capsys, "coord-check", str(TINY), "--widths", "64,66", "--steps", "1",
                                    "--out", str(tmp_path / "cc"))
    assert status == 2 and "66" in err and "model" in err, err
    assert not (tmp_path / "cc").exists()


def test_a_torn_last_metrics_row_is_dropped_and_the_run_resumes(saved, tmp_path, capsys):
    """A kill while row 40 is written comes before checkpoint 40 (rows of a checkpointed step
    are written first): the run resumes from 30 and logs 31-40 again."""
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")
    rows = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text(rows[:-30])  # what kill -9 mid-write leaves
    status, _, err = cli_in_process(capsys, "plot", str(workdir), "--out", str(tmp_path / "curves.png"))
    assert status == 0 and "dropped its last line" in err, err
    status, out, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                      "--set", "train.steps=45", "--set", "train.log_every=1")
    assert status == 0 and "resumed from checkpoint at step 30" in out and "dropped its last line" in err, err
    logged = read_metrics(Layout(workdir).metrics, warn=pytest.fail)  # the torn line is gone: no warning now
    assert [row["step"] for row in logged] == list(range(1, 46))


def test_a_resume_that_fails_after_the_config_checks_rewrites_nothing(saved, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"  # damaged in the middle: not what a crash leaves
    (workdir / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(workdir)
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir), "--set", "train.steps=50")
    assert status == 2 and "metrics.jsonl line 4" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir) == before  # config.yaml still says 40 steps


def test_resume_is_checked_against_what_the_checkpoint_was_trained_with(saved, tmp_path, capsys):
    """A config.yaml that no longer says what the checkpoints hold (edited, or written by
    another tool) does not let an identity key change: the checkpoint's meta decides."""
    import yaml

    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    recorded = yaml.safe_load((workdir / "config.yaml").read_text())
    recorded["data"]["seq_len"] = 32
    (workdir / "config.yaml").write_text(yaml.safe_dump(recorded))
    before = snapshot(workdir)
    status, _, err = cli_in_process(capsys, "train", str(workdir / "config.yaml"), "--workdir", str(workdir))
    assert status == 2 and "'data.seq_len'" in err and "holds a run with 64" in err, err
    assert snapshot(workdir) == before


@pytest.mark.parametrize("content, word", [("model: [\n", "invalid YAML at line 2"),
                                           ("- a\n", "must be a mapping")])
def test_a_corrupt_saved_config_is_named_by_resume_and_eval(content, word, saved, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    (workdir / "config.yaml").write_text(content)
    before = snapshot(workdir)
    for argv in (["train", str(TINY), "--workdir", str(workdir)], ["eval", str(workdir)]):
        status, _, err = cli_in_process(capsys, *argv)
        assert status == 2 and f"{workdir}/config.yaml" in err and word in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir) == before


def test_an_unwritable_workdir_is_one_line_before_anything_is_compiled(tmp_path):
    """As another user would meet it: root drops the capability that bypasses permissions."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    for workdir in (locked / "run", locked):
        done = subprocess.run([*drop, sys.executable, "-m", "jaxtrain", "train", str(TINY), "--workdir", str(workdir)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 2 and "cannot write in" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(locked.iterdir()) == []
