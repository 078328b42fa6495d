"""Evaluation tasks (config `eval.tasks`; docs/evaluation.md): held-out bits per byte and
multiple-choice accuracy, scored by the Scorer (run/scoring.py) the way
lm-evaluation-harness scores `loglikelihood_rolling` and `multiple_choice` tasks, so a
task here and the same task run by lm-eval on the exported model agree.

    tasks = Tasks.for_config(cfg, spec, mesh)     # reads and tokenizes the files once
    tasks(params) -> {"eval/<name>/acc": ..., "eval/<name>/acc_norm": ..., "eval/<name>/bits_per_byte": ...}

The training loop calls it every `eval.every` steps (default train.eval_every), at the last
step and, in a new run, at step 0; `jaxtrain eval WORKDIR --tasks` calls it on a checkpoint.

bits_per_byte (lm-eval's metric of that name): every token of each document scored with
rolling windows of data.seq_len, the first conditioned on the end-of-document token,
    bits/byte = -sum_docs ll / (ln 2 * sum_docs UTF-8 bytes).
multiple_choice (lm-eval's ConfigurableTask, output_type multiple_choice): each choice is
the continuation target_delimiter + choice of the question's context, tokenized as HFLM's
`_encode_pair` (trailing spaces of the context move to the continuation; the continuation's
tokens are those of encode(context + continuation) after the len(encode(context)) first;
an empty context is the end-of-document token, as lm-eval's `loglikelihood`), and
    acc      = mean [argmax_i ll_i == gold]
    acc_norm = mean [argmax_i ll_i / len(choice_i) == gold]   (len in characters, without
                                                              the delimiter: lm-eval's
                                                              process_results)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError, DataError
from jaxtrain.config.schema import Config, TaskConfig
from jaxtrain.data.sources import run_tokenizer
from jaxtrain.data.task_files import Question, read_documents, read_questions
from jaxtrain.data.tokenizer import Tokenizer, encode_text
from jaxtrain.run.scoring import Scorer


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization of a (context, continuation) request for a causal model."""
    encode = lambda text: encode_text(tokenizer, text).tolist()
    if not context:
        tokens = encode(continuation)
        return ([tokenizer.eos_id], tokens) if tokens[:1] != [tokenizer.eos_id] else (tokens[:1], tokens[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_tokens = encode(context)
    return context_tokens, encode(context + continuation)[len(context_tokens):]


@dataclasses.dataclass(frozen=True)
class BitsPerByte:
    name: str
    documents: list[list[int]]  # token ids, no end token
    n_bytes: int

    @classmethod
    def from_documents(cls, name: str, documents: list[bytes], tokenizer: Tokenizer) -> BitsPerByte:
        tokens = [t.astype(np.int64).tolist() for t in tokenizer.encode_documents(documents)]
        return cls(name, tokens, sum(len(d) for d in documents))

    def score(self, scorer: Scorer, params: Any, eos_id: int) -> dict[str, float]:
        ll = sum(scorer.rolling(params, self.documents, eos_id))
        return {f"eval/{self.name}/bits_per_byte": -ll / (math.log(2) * max(self.n_bytes, 1))}


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    name: str
    questions: list[Question]
    requests: list[tuple[list[int], list[int]]]  # every question's choices in order

    @classmethod
    def from_questions(cls, name: str, path: str, questions: list[Question], tokenizer: Tokenizer,
                       delimiter: str, seq_len: int) -> MultipleChoice:
        requests = []
        for number, question in enumerate(questions, 1):
            for index, choice in enumerate(question.choices):
                context, continuation = encode_pair(tokenizer, question.context, delimiter + choice)
                if not 1 <= len(continuation) <= seq_len:
                    raise DataError(f"{path}: question {number}, choice {index} is {len(continuation)} tokens "
                                    f"after its context; it must be 1 to data.seq_len = {seq_len}")
                requests.append((context, continuation))
        return cls(name, questions, requests)

    def loglikelihoods(self, scorer: Scorer, params: Any) -> list[float]:
        """log p(delimiter + choice | context) of every choice of every question, in order."""
        return [ll for ll, _ in scorer.continuations(params, self.requests)]

    def score(self, scorer: Scorer, params: Any, eos_id: int) -> dict[str, float]:
        lls = iter(self.loglikelihoods(scorer, params))
        right = right_norm = 0
        for question in self.questions:
            ll = np.array([next(lls) for _ in question.choices])
            right += int(np.argmax(ll)) == question.gold
            right_norm += int(np.argmax(ll / [len(c) for c in question.choices])) == question.gold
        n = len(self.questions)
        return {f"eval/{self.name}/acc": right / n, f"eval/{self.name}/acc_norm": right_norm / n}


def load_task(task: TaskConfig, tokenizer: Tokenizer, seq_len: int) -> BitsPerByte | MultipleChoice:
    """Read and tokenize one configured task."""
    key = f"eval.tasks {task.name}"
    if task.kind == "bits_per_byte":
        return BitsPerByte.from_documents(task.name, read_documents(task.path, task.text_field, task.limit, key),
                                          tokenizer)
    return MultipleChoice.from_questions(task.name, task.path, read_questions(task.path, task.limit, key),
                                         tokenizer, task.target_delimiter, seq_len)


class Tasks:
    """Tasks scored with one Scorer on a mesh: params -> {eval/<task>/<metric>: value}."""

    def __init__(self, tasks: Sequence[BitsPerByte | MultipleChoice], scorer: Scorer, eos_id: int):
        self.tasks, self.scorer, self.eos_id = list(tasks), scorer, eos_id

    @classmethod
    def for_config(cls, cfg: Config, spec: ts.ModelSpec, mesh: Mesh, names: Sequence[str] | None = None,
                   text: Sequence[str] = ()) -> Tasks:
        """The config's eval.tasks (None: all; else those `names`), and with `text` (text
        files, globs or jsonl files of {"text": ...}) a bits_per_byte task named "text"."""
        known = [t.name for t in cfg.eval.tasks]
        unknown = [n for n in names or () if n not in known]
        if unknown:
            raise ConfigError("eval.tasks", f"no task named {', '.join(unknown)} (the config has: "
                                            f"{', '.join(known) or 'none'})")
        tokenizer = run_tokenizer(cfg)
        chosen = [t for t in cfg.eval.tasks if names is None or t.name in names]
        tasks = [load_task(t, tokenizer, cfg.data.seq_len) for t in chosen]
        if text:
            documents = [d for path in text for d in read_documents(path, key="--text")]
            tasks.append(BitsPerByte.from_documents("text", documents, tokenizer))
        return cls(tasks, Scorer(spec, mesh, cfg.data.seq_len, cfg.eval.batch_size or cfg.train.batch_size),
                   tokenizer.eos_id)

    def __call__(self, params: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        for task in self.tasks:
            results.update(task.score(self.scorer, params, self.eos_id))
        return results


def every(cfg: Config) -> int:
    """Steps between task evaluations in the loop (0: no tasks)."""
    return (cfg.eval.every or cfg.train.eval_every) if cfg.eval.tasks else 0
