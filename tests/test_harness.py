"""lm-evaluation-harness on jaxtrain checkpoints: `jaxtrain lm-eval --model jaxtrain` on a run
scores the local tasks of docs/harness_tasks.py as `lm_eval --model hf` scores the run's
export (acc and acc_norm equal, bits_per_byte within 1e-5, the same greedy completions);
the Python API gives the same; generate_until cuts at its stop strings and token budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from conftest import REPO, TINY, cli_in_process
from jaxtrain import cli
from jaxtrain.config.files import load_config
from jaxtrain.run.loop import run
from jaxtrain.tools.generate import generate
from jaxtrain.tools.harness import JaxtrainLM, cut_generation

TASKS = ("stdlib_next_line", "stdlib_line_completion", "stdlib_text")
LM_EVAL = Path(sys.executable).with_name("lm_eval")  # the console script of this interpreter's lm-eval


def harness_env(tmp: Path) -> dict[str, str]:
    """This environment (8 simulated devices), offline, with a datasets cache of its own."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"),
            "TOKENIZERS_PARALLELISM": "false"}


def start_harness(command: list[str], tasks: Path, out: Path, model: str, model_args: str) -> subprocess.Popen:
    args = ["--model", model, "--model_args", model_args, "--include_path", str(tasks), "--tasks", ",".join(TASKS),
            "--batch_size", "8", "--device", "cpu", "--output_path", str(out), "--log_samples"]
    return subprocess.Popen([*command, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=harness_env(out.parent))


def finished(proc: subprocess.Popen, out: Path, timeout: float = 240) -> dict:
    """The results of a harness process, and its per-task samples (by doc_id) under "samples"."""
    printed, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, printed[-3000:]
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for task in TASKS:
        (file,) = out.glob(f"*/samples_{task}_*.jsonl")
        samples[task] = {row["doc_id"]: row for row in map(json.loads, file.read_text().splitlines())}
    return {"results": results, "samples": samples}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny run trained 20 steps, its export, the local tasks, and `lm_eval --model hf` on
    the export (started at once: it runs while the tests of this module do)."""
    root = tmp_path_factory.mktemp("harness")
    workdir, export, tasks = root / "run", root / "hf", root / "tasks"
    written = subprocess.run([sys.executable, str(REPO / "docs" / "harness_tasks.py"), str(tasks)],
                             capture_output=True, text=True, check=True)
    assert all(Path(line).exists() for line in written.stdout.split()), written
    run(load_config(TINY, ["train.steps=20", "train.eval_every=20"]), workdir, console=False)
    assert cli.main(["export", str(workdir), "--out", str(export)]) == 0
    # the export's context is the run's: HFLM reads max_position_embeddings as max_length
    assert json.loads((export / "config.json").read_text())["max_position_embeddings"] == 64
    hf = start_harness([str(LM_EVAL)], tasks, root / "out_hf", "hf", f"pretrained={export},dtype=float32")
    yield {"workdir": workdir, "tasks": tasks, "root": root, "hf": lambda: finished(hf, root / "out_hf")}
    if hf.poll() is None:
        hf.kill()
        hf.communicate()


@pytest.mark.slow
def test_jaxtrain_model_type_scores_as_hf_scores_the_export(setup):
    out = setup["root"] / "out_jaxtrain"
    mine = finished(start_harness([sys.executable, "-m", "jaxtrain", "lm-eval"], setup["tasks"], out, "jaxtrain",
                                  f"workdir={setup['workdir']}"), out)
    theirs = setup["hf"]()
    ours, hf = mine["results"], theirs["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["stdlib_next_line"][metric] == hf["stdlib_next_line"][metric], (ours, hf)
    assert abs(ours["stdlib_text"]["bits_per_byte,none"] - hf["stdlib_text"]["bits_per_byte,none"]) < 1e-5
    assert ours["stdlib_line_completion"]["exact_match,none"] == hf["stdlib_line_completion"]["exact_match,none"]
    # not only the aggregates: every choice's log-likelihood, every greedy completion
    for doc, row in theirs["samples"]["stdlib_next_line"].items():
        np.testing.assert_allclose([float(r[0]) for r in mine["samples"]["stdlib_next_line"][doc]["filtered_resps"]],
                                   [float(r[0]) for r in row["filtered_resps"]], atol=1e-4, rtol=0)
    completions = {task: {doc: row["filtered_resps"] for doc, row in result["samples"]["stdlib_line_completion"].items()}
                   for task, result in (("mine", mine), ("theirs", theirs))}
    assert completions["mine"] == completions["theirs"]
    assert len(completions["mine"]) == 40


@pytest.mark.slow
def test_python_api_evaluates_a_model_object(setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=JaxtrainLM(str(setup["workdir"]), batch_size=8),
                                      tasks=["stdlib_next_line"], task_manager=TaskManager(include_path=str(setup["tasks"])))
    hf = setup["hf"]()["results"]["stdlib_next_line"]
    assert results["results"]["stdlib_next_line"]["acc,none"] == hf["acc,none"]
    assert results["results"]["stdlib_next_line"]["acc_norm,none"] == hf["acc_norm,none"]


def generation_request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


@pytest.mark.slow
def test_generate_until_stops_at_the_first_stop_string_and_the_token_budget(setup):
    lm = JaxtrainLM(str(setup["workdir"]))
    prompt = "def __init__(self, "
    ids = lm.tok_encode(prompt)
    greedy = lm.tok_decode(np.asarray(generate(lm.run.model(), np.asarray([ids], np.int32), max_new_tokens=24,
                                               temperature=0))[0].tolist())
    assert "\x00" not in greedy and len(greedy) == 24, greedy  # ASCII, no end of document: cut by the stops only
    early, late = greedy[3:5], greedy[12:14]
    cut = min(greedy.find(early), greedy.find(late))
    requests = [generation_request(prompt, until=[late, early], max_gen_toks=24),  # the first to occur wins
                generation_request(prompt, until=late, max_gen_toks=24),           # a single string
                generation_request(prompt, until=[], max_gen_toks=24),             # none: the budget
                generation_request(prompt, until=[""], max_gen_toks=7),            # empty: no stop; 7 tokens
                generation_request("x" * 200 + prompt, until=[], max_gen_toks=24)]  # context left-truncated
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got[:4] == [greedy[:cut], greedy[:greedy.find(late)], greedy, greedy[:7]]
    truncated = lm.tok_encode("x" * 200 + prompt)[-(64 - 24):]
    assert got[4] == lm.tok_decode(np.asarray(generate(lm.run.model(), np.asarray([truncated], np.int32),
                                                       max_new_tokens=24, temperature=0))[0].tolist())
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([generation_request(prompt, do_sample=True, temperature=0.8)], disable_tqdm=True)
    with pytest.raises(ValueError, match="no context"):
        lm.generate_until([generation_request(prompt, max_gen_toks=64)], disable_tqdm=True)


def test_generated_text_is_cut_at_end_of_document_then_at_the_first_stop():
    decode = lambda ids: bytes(ids).decode()  # noqa: E731 - byte ids
    text = list(b"ab\ncd\n\nef")
    assert cut_generation(text, 0, decode, ["\n\n", "\n"]) == "ab"
    assert cut_generation(text, 0, decode, ["\n\n"]) == "ab\ncd"
    assert cut_generation(text, 0, decode, ["", "zz"]) == "ab\ncd\n\nef"
    assert cut_generation([*b"ab", 0, *b"\ncd"], 0, decode, ["\n"]) == "ab"  # the end of document first
    assert cut_generation(list(b"\nab"), 0, decode, ["\n"]) == ""


def test_lm_eval_command_without_lm_eval_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if not installed
    status, out, err = cli_in_process(capsys, "lm-eval", "--model", "jaxtrain")
    assert status == 2 and out == ""
    assert err.startswith("jaxtrain: error: jaxtrain lm-eval needs lm-evaluation-harness") and "jaxtrain[harness]" in err
    assert err.count("\n") == 1
