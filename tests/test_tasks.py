"""Evaluation tasks (jaxtrain/run/tasks.py): the loop's scores at steps 0 and N are
`jaxtrain eval --tasks`'s on the same checkpoints; the multiple-choice log-likelihoods are
those `transformers` (PyTorch float32) computes on the Hugging Face export with its own
tokenizer, as lm-evaluation-harness's HFLM would; `--text` scores less than a batch; the
task builder is deterministic; a bad task file is one line naming file, line and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, cli_in_process, figure_panels, run_in_process
from jaxtrain.config.errors import ConfigError, DataError
from jaxtrain.config.files import load_config
from jaxtrain.data.tokenizer import ByteTokenizer
from jaxtrain.run.tasks import encode_pair, load_task
from jaxtrain.tools.make_task import make_tasks

TASK_INPUTS = ("{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/asyncio/*.py")  # tiny.yaml's data.paths
STEPS = 10


def _tasks_setting(directory) -> str:
    return (f"eval={{every: {STEPS}, batch_size: 8, tasks: ["
            f"{{name: next_line, kind: multiple_choice, path: '{directory}/next_line.jsonl', target_delimiter: \"\\n\"}},"
            f"{{name: heldout, kind: bits_per_byte, path: '{directory}/heldout.jsonl'}}]}}")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny run with the built tasks evaluated in the loop at steps 0 and STEPS."""
    from jaxtrain.run.loop import run

    tasks = tmp_path_factory.mktemp("tasks")
    built = make_tasks(tasks, TASK_INPUTS, val_fraction=0.1, questions=12, documents=3)
    workdir = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, [f"train.steps={STEPS}", f"checkpoint.every_steps={STEPS}", _tasks_setting(tasks)])
    run(cfg, workdir, console=False)
    return workdir, tasks, built


def test_builder_is_deterministic_and_holds_out_the_runs_validation_files(tmp_path):
    first = make_tasks(tmp_path / "a", TASK_INPUTS, val_fraction=0.1, questions=12, documents=3)
    make_tasks(tmp_path / "b", TASK_INPUTS, val_fraction=0.1, questions=12, documents=3)
    for name in ("next_line.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    questions = [json.loads(line) for line in (tmp_path / "a" / "next_line.jsonl").read_text().splitlines()]
    assert first["questions"] == len(questions) == 12 and first["documents"] == 3
    assert all(len(q["choices"]) == 4 and 0 <= q["gold"] < 4 for q in questions)
    assert len({q["gold"] for q in questions}) > 1  # the answer is not always in one place
    from jaxtrain.data.corpus import validation_files

    held_out = {p.rsplit("/", 1)[-1] for p in validation_files(TASK_INPUTS, 0.1)}
    assert {q["source"].split(":")[0] for q in questions} <= held_out


@pytest.mark.slow
def test_loop_scores_at_steps_0_and_n_are_jaxtrain_evals(evaluated, capsys, tmp_path):
    workdir, _, _ = evaluated
    rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    keys = ["eval/next_line/acc", "eval/next_line/acc_norm", "eval/heldout/bits_per_byte"]
    assert set(keys) <= set(rows[0]) and set(keys) <= set(rows[STEPS]) and "val_loss" in rows[0]
    assert rows[STEPS]["eval/heldout/bits_per_byte"] < rows[0]["eval/heldout/bits_per_byte"]
    for step in (0, STEPS):
        status, out, err = cli_in_process(capsys, "eval", str(workdir), "--step", str(step), "--tasks")
        assert status == 0, err
        result = json.loads(out)
        assert result["step"] == step
        assert {k: result[k] for k in keys} == {k: rows[step][k] for k in keys}
    status, out, _ = cli_in_process(capsys, "eval", str(workdir), "--tasks", "heldout")
    assert status == 0 and set(json.loads(out)) == {"step", "tokens_seen", "eval/heldout/bits_per_byte"}
    status, _, err = cli_in_process(capsys, "plot", str(workdir), "--out", str(tmp_path / "eval.png"),
                                    "--metric", "eval/*")
    assert status == 0, err
    assert [(p["title"], list(p["curves"].values())) for p in figure_panels(tmp_path / "eval.png")] == [
        (key, [2]) for key in keys]  # steps 0 and STEPS


@pytest.mark.slow
def test_text_shorter_than_a_batch(evaluated, capsys, tmp_path):
    workdir, _, _ = evaluated
    short = tmp_path / "short.txt"
    short.write_text("import json\nprint(json.dumps({'a': 1}))\n")  # one window: 1 row of the 8
    status, out, err = cli_in_process(capsys, "eval", str(workdir), "--text", str(short))
    assert status == 0, err
    result = json.loads(out)
    assert set(result) == {"step", "tokens_seen", "eval/text/bits_per_byte"}
    assert 0 < result["eval/text/bits_per_byte"] < 8


@pytest.mark.slow
def test_multiple_choice_equals_transformers_on_the_export(evaluated, capsys, tmp_path):
    import torch
    import transformers

    from jaxtrain.run.scoring import Scorer
    from jaxtrain.tools.saved_run import load_run

    workdir, tasks, _ = evaluated
    status, _, err = cli_in_process(capsys, "export", str(workdir), "--out", str(tmp_path / "hf"))
    assert status == 0, err
    saved = load_run(workdir)
    task = load_task(saved.cfg.eval.tasks[0], ByteTokenizer(), saved.cfg.data.seq_len)
    ours = task.loglikelihoods(Scorer(saved.spec, saved.mesh, saved.cfg.data.seq_len, 8), saved.params)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    seq_len = saved.cfg.data.seq_len
    theirs = []
    for question in task.questions:
        for choice in question.choices:
            context, continuation = question.context, "\n" + choice  # HFLM's _encode_pair
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            continuation_ids = whole[len(context_ids):]
            inputs = (context_ids + continuation_ids)[-(seq_len + 1):][:-1]  # HFLM's _loglikelihood_tokens
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].float(), -1)
            picked = logp[len(inputs) - len(continuation_ids):, :].gather(1, torch.tensor(continuation_ids)[:, None])
            theirs.append(float(picked.sum()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    lls = iter(theirs)
    per_question = [(np.array([next(lls) for _ in q.choices]), q) for q in task.questions]
    acc = np.mean([np.argmax(ll) == q.gold for ll, q in per_question])
    acc_norm = np.mean([np.argmax(ll / [len(c) for c in q.choices]) == q.gold for ll, q in per_question])
    row = next(r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["step"] == STEPS)
    assert (row["eval/next_line/acc"], row["eval/next_line/acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_encode_pair_is_lm_evals():
    tokenizer = ByteTokenizer()
    assert encode_pair(tokenizer, "a = ", "1") == (list(b"a ="), list(b" 1"))  # trailing spaces move over
    assert encode_pair(tokenizer, "", "xy") == ([0], list(b"xy"))  # empty context: the end-of-document id


BAD_FILES = [  # (kind, file contents, the message's tail)
    ("multiple_choice", '{"context": "a", "choices": ["b"], "gold": 0}\nnot json\n', "line 2: not JSON"),
    ("multiple_choice", '{"context": "a", "choices": ["b"]}\n', "line 1: no field 'gold'"),
    ("multiple_choice", '{"context": "a", "choices": ["b", "c"], "gold": 2}\n', "line 1: field 'gold' is 2"),
    ("multiple_choice", '{"context": "a", "choices": "b", "gold": 0}\n', "line 1: field 'choices' must be a list"),
    ("multiple_choice", '{"context": "a", "choices": ["b", ""], "gold": 0}\n', "non-empty strings"),
    ("multiple_choice", '[1, 2]\n', "line 1: not a JSON object"),
    ("multiple_choice", "\n\n", "no questions"),
    ("bits_per_byte", '{"text": "a"}\n{"body": "b"}\n', "line 2: no field 'text'"),
    ("bits_per_byte", '{"text": 3}\n', "line 1: field 'text' must be a str"),
]


@pytest.mark.parametrize("kind,contents,message", BAD_FILES)
def test_bad_task_files_are_one_line_errors(tmp_path, kind, contents, message):
    from jaxtrain.config.schema import TaskConfig

    path = tmp_path / "task.jsonl"
    path.write_text(contents)
    with pytest.raises(DataError, match=f"^{path}.*{message}") as raised:
        load_task(TaskConfig(name="t", kind=kind, path=str(path)), ByteTokenizer(), 64)
    assert "\n" not in str(raised.value)


def test_bad_task_configs_and_paths(tmp_path, capsys):
    from jaxtrain.config.schema import TaskConfig

    with pytest.raises(DataError, match="no files match"):
        load_task(TaskConfig(name="t", kind="bits_per_byte", path=str(tmp_path / "none*.txt")), ByteTokenizer(), 64)
    with pytest.raises(DataError, match="a multiple_choice task reads a .jsonl file"):
        load_task(TaskConfig(name="t", kind="multiple_choice", path=str(tmp_path / "q.txt")), ByteTokenizer(), 64)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "a", "choices": ["b" * 70], "gold": 0}) + "\n")
    with pytest.raises(DataError, match="question 1, choice 0 is 71 tokens"):
        load_task(TaskConfig(name="t", kind="multiple_choice", path=str(long)), ByteTokenizer(), 64)
    with pytest.raises(ConfigError, match="task names must differ"):
        load_config(TINY, ["eval={tasks: [{name: a, kind: bits_per_byte, path: x}, "
                           "{name: a, kind: bits_per_byte, path: y}]}"])
    missing = tmp_path / "missing.jsonl"
    result = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path / "w"), "--set",
                            f"eval={{tasks: [{{name: q, kind: multiple_choice, path: '{missing}'}}]}}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and f"{missing}: cannot read" in result.stderr
    result = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path / "w"), "--set",
                            "eval={batch_size: 12, tasks: [{name: h, kind: bits_per_byte, path: '{stdlib}/json/*.py'}]}")
    assert result.returncode == 2 and "eval.batch_size" in result.stderr and result.stderr.count("\n") == 1
