"""Three lm-evaluation-harness tasks over local text, for trying the harness where nothing can
be downloaded (and for tests/test_harness.py, which compares `--model hf` on an export with
`--model jaxtrain` on these tasks):

    python docs/harness_tasks.py TASKS_DIR [--docs N]
    lm_eval --model hf --model_args pretrained=EXPORT,dtype=float32 --device cpu \
        --include_path TASKS_DIR --tasks stdlib_next_line,stdlib_line_completion,stdlib_text

    stdlib_next_line   multiple choice (acc, acc_norm): two lines of a Python standard-library
                       module, then its true next line against three lines of other modules
    stdlib_line_completion  generate_until (exact_match): two lines and half of the next,
                       greedy up to a newline or 16 tokens, against the rest of that line
    stdlib_text        rolling log-likelihood (word_perplexity, byte_perplexity,
                       bits_per_byte) of paragraphs of standard-library modules

The text is this interpreter's standard library (modules outside configs/tiny.yaml's
training data), so the documents differ between Python versions but never need a network.
Each task is a YAML (`dataset_path: json` over a jsonl file named by its absolute path, so
the tasks work from any directory) beside its jsonl, written into TASKS_DIR; the lines
are drawn with a fixed seed, so a Python version always writes the same tasks. Lines are
short (8 to 40 characters of text): configs/tiny.yaml's context is 64 tokens, which a
choice, and a completion's context plus its 16 tokens, must fit.

For a run's own held-out files use `jaxtrain data make-tasks` (jaxtrain/tools/make_task.py):
its next-line and held-out tasks are the ones the training loop scores, with lm-eval YAMLs
beside them. This script is for the harness alone: fixed modules any Python has, a
generate_until task (the loop scores no generation) and lines short enough for tiny.yaml.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path

MODULES = ("textwrap.py", "shlex.py", "csv.py", "argparse.py", "string.py", "fractions.py")


def module_lines(name: str) -> list[str]:
    """The lines of a standard-library module with 8 to 40 characters of text, right-stripped."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
    return [line.rstrip() for line in text.splitlines() if 8 <= len(line.strip()) <= 40]


def _line_picks(count: int, seed: int):
    """`count` times (rng, module name, every module's lines, index of a line with two
    lines before it), the modules taken in turn; the caller may draw more from rng."""
    rng = random.Random(seed)
    lines = {name: module_lines(name) for name in MODULES}
    for k in range(count):
        name = MODULES[k % len(MODULES)]
        yield rng, name, lines, rng.randrange(2, len(lines[name]))


def next_line_docs(count: int, seed: int = 0) -> list[dict]:
    """`count` docs {context, choices, gold}."""
    docs = []
    for rng, name, lines, i in _line_picks(count, seed):
        context, truth = "\n".join(lines[name][i - 2:i]) + "\n", lines[name][i].lstrip()
        others = [line.lstrip() for other in MODULES if other != name for line in lines[other]]
        choices = {truth}
        while len(choices) < 4:
            choices.add(rng.choice(others))
        choices = sorted(choices)
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "gold": choices.index(truth)})
    return docs


def completion_docs(count: int, seed: int = 1) -> list[dict]:
    """`count` docs {context, target}: two lines and the first half of the next line of a
    module; the target is the rest of that line."""
    docs = []
    for _, name, lines, i in _line_picks(count, seed):
        half = len(lines[name][i]) // 2
        docs.append({"context": "\n".join(lines[name][i - 2:i]) + "\n" + lines[name][i][:half],
                     "target": lines[name][i][half:]})
    return docs


def paragraph_docs(count: int) -> list[dict]:
    """`count` docs {text}: paragraphs (blank-line separated) of 200 to 1500 characters."""
    docs = []
    for name in MODULES:
        text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
        docs += [{"text": p.strip("\n")} for p in text.split("\n\n") if 200 <= len(p.strip("\n")) <= 1500]
    return docs[:count]


NEXT_LINE_YAML = """\
task: stdlib_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

COMPLETION_YAML = """\
task: stdlib_line_completion
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TEXT_YAML = """\
task: stdlib_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(out: Path, docs: int = 40) -> list[Path]:
    """Write the three tasks (YAML + jsonl) into `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, rows, yaml in (("stdlib_next_line", next_line_docs(docs), NEXT_LINE_YAML),
                             ("stdlib_line_completion", completion_docs(docs), COMPLETION_YAML),
                             ("stdlib_text", paragraph_docs(docs), TEXT_YAML)):
        data = out.absolute() / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        (out / f"{task}.yaml").write_text(yaml.format(data=json.dumps(str(data))), encoding="utf-8")
        written += [data, out / f"{task}.yaml"]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the tasks (created if missing)")
    parser.add_argument("--docs", type=int, default=40, help="documents per task (default 40)")
    args = parser.parse_args()
    for path in write_tasks(args.out, args.docs):
        print(path)


if __name__ == "__main__":
    main()
