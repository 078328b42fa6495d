"""`jaxtrain data make-tasks`: evaluation tasks built from the held-out files of a text
corpus (default: the standard library, the default run's corpus), deterministically, so
a run on that corpus is evaluated on text it never trained on (docs/evaluation.md).

    DIR/next_line.jsonl   multiple choice: given `context_lines` lines of a validation file,
                          pick the line that follows among `choices` (the others: lines of
                          other validation files), {"context", "choices", "gold"} per line
    DIR/heldout.jsonl     bits per byte: {"text"} per line, the start (up to `doc_chars`
                          characters, cut at a line end) of `documents` validation files
    DIR/tasks.yaml        the config's `eval:` section that scores both in the loop
    DIR/next_line.yaml, DIR/heldout.yaml
                          the same tasks for lm-evaluation-harness (`lm_eval --include_path DIR
                          --tasks next_line,heldout`), reading the same jsonl files

The validation files are those of data.paths' split (sha1 of the relative path, the
`val_fraction` of the run), so the inputs and val_fraction must be the run's. Lines are
taken with their indentation and without trailing spaces; a usable line (an answer or a
distractor) has 12 to `max_line_chars` characters that are not all blank. The context is
the lines joined by newlines, and each choice is scored after a newline (target_delimiter
"\\n"). Everything is drawn by one numpy generator seeded with `seed`: the same inputs
give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from jaxtrain.config.errors import DataError
from jaxtrain.data.corpus import read_text_file, validation_files

DELIMITER = "\n"
_HARNESS_COMMON = {"dataset_path": "json", "test_split": "test"}


def _usable(line: str, max_chars: int) -> bool:
    return 12 <= len(line.strip()) and len(line) <= max_chars


def next_line_questions(lines: dict[str, list[str]], rng: np.random.Generator, questions: int,
                        context_lines: int = 4, choices: int = 4, max_line_chars: int = 60) -> list[dict]:
    """Questions from the files' lines (path -> lines, rstripped)."""
    files = sorted(lines)
    candidates = [(f, i) for f in files for i in range(context_lines, len(lines[f]))
                  if _usable(lines[f][i], max_line_chars)
                  and sum(bool(line.strip()) for line in lines[f][i - context_lines:i]) >= 2]
    pool = [(f, line) for f in files for line in lines[f] if _usable(line, max_line_chars)]
    if len(files) < 2 or not candidates:
        raise DataError(f"{len(files)} validation files with {len(candidates)} usable lines: too few for questions")
    made = []
    for pick in rng.choice(len(candidates), size=min(questions, len(candidates)), replace=False):
        path, index = candidates[pick]
        answer, others = lines[path][index], []
        for _ in range(1000 * choices):
            if len(others) == choices - 1:
                break
            other_path, line = pool[rng.integers(len(pool))]
            if other_path != path and line.strip() not in {c.strip() for c in [answer, *others]}:
                others.append(line)
        if len(others) < choices - 1:
            raise DataError(f"too few distinct lines in other validation files for {choices} choices")
        options = [answer, *others]
        order = rng.permutation(len(options))
        made.append({"context": "\n".join(lines[path][index - context_lines:index]),
                     "choices": [options[k] for k in order], "gold": int(np.argmax(order == 0)),
                     "source": f"{Path(path).name}:{index + 1}"})
    return made


def heldout_documents(texts: dict[str, str], rng: np.random.Generator, documents: int,
                      doc_chars: int = 4000) -> list[dict]:
    """The start of `documents` files drawn at random, cut after the last whole line."""
    files = sorted(texts)
    chosen = [files[k] for k in sorted(rng.permutation(len(files))[:documents])]
    cut = lambda text: text if len(text) <= doc_chars else text[:text.rfind("\n", 0, doc_chars) + 1] or text[:doc_chars]
    return [{"text": cut(texts[f]), "source": Path(f).name} for f in chosen if texts[f].strip()]


def harness_yaml(name: str, path: Path, multiple_choice: bool) -> dict:
    """An lm-evaluation-harness task reading the jsonl at `path` (absolute)."""
    task = {"task": name, **_HARNESS_COMMON, "dataset_kwargs": {"data_files": {"test": str(path)}}}
    if multiple_choice:
        return {**task, "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": DELIMITER,
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    return {**task, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


def make_tasks(out: str | Path, inputs: tuple[str, ...] = ("{stdlib}/**/*.py",), val_fraction: float = 0.05,
               questions: int = 200, documents: int = 24, seed: int = 0) -> dict:
    """Write the task files (module docstring) into `out`; returns what was written."""
    out = Path(out).absolute()
    files = validation_files(tuple(inputs), val_fraction, key="--input")
    texts = {f: read_text_file(f).decode("utf-8", errors="replace") for f in files}
    rng = np.random.default_rng(seed)
    made = next_line_questions({f: [line.rstrip() for line in t.splitlines()] for f, t in texts.items()},
                               rng, questions)
    held = heldout_documents(texts, rng, documents)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("next_line", made), ("heldout", held)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        harness = harness_yaml(name, out / f"{name}.jsonl", multiple_choice=name == "next_line")
        (out / f"{name}.yaml").write_text(yaml.safe_dump(harness, sort_keys=False))
    section = {"eval": {"tasks": [
        {"name": "next_line", "kind": "multiple_choice", "path": str(out / "next_line.jsonl"),
         "target_delimiter": DELIMITER},
        {"name": "heldout", "kind": "bits_per_byte", "path": str(out / "heldout.jsonl")}]}}
    (out / "tasks.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
    return {"out": str(out), "validation_files": len(files), "questions": len(made), "documents": len(held),
            "heldout_bytes": sum(len(d["text"].encode()) for d in held)}
