"""lm-evaluation-harness's model type `jaxtrain`: any harness task on a saved checkpoint,
sharded over this machine's devices, with no export.

    jaxtrain lm-eval --model jaxtrain --model_args workdir=runs/small[,step=N] --tasks ...
    lm_eval.simple_evaluate(model=JaxtrainLM("runs/small"), tasks=[...])

Importing this module registers the class under "jaxtrain" (`@register_model`); lm-eval
0.4 finds models only in its own in-process registry (lm_eval/models/__init__.py,
MODEL_MAPPING; no entry points), so `jaxtrain lm-eval` (jaxtrain/commands/harness.py)
imports it and then runs lm-eval's own command line. lm-eval is an optional dependency
(`pip install 'jaxtrain[harness]'`): only this module imports it.

The class is HFLM's conventions on jaxtrain's parts (it subclasses lm-eval's TemplateLM,
whose `loglikelihood` is the one HFLM runs):

* tokens: the run's tokenizer (`run_tokenizer`, `encode_text`: no special token added);
  a context's trailing whitespace moves to the continuation, context_enc = encode(context),
  continuation_enc = encode(context + continuation)[len(context_enc):]; an empty context
  becomes the end-of-document id (`prefix_token_id` = eot, as an export's bos = eos);
* max_length = the run's data.seq_len (an export's max_position_embeddings);
* loglikelihood and loglikelihood_rolling: jaxtrain/run/scoring.py's Scorer, one jitted
  forward on the loading mesh (requests packed into (batch_size, seq_len) rows);
* generate_until: greedy, KV-cached (tools/generate.py), the context left-truncated to
  max_length - max_gen_toks; the text is cut at the first end-of-document token and then
  at the first stop string of `until` (HFLM adds the end-of-document text to `until`).
  Requests with the same context length and max_gen_toks run as one batch (its rows padded
  to a power of two); the decoding loop compiles once per distinct (rows, length, budget).

batch_size (lm-eval's --batch_size) counts rows of seq_len tokens per forward, rounded up
to a multiple of the mesh's data x fsdp x expert; "auto" is the run's train.batch_size. lm-eval's
--device is ignored: the parameters live where `load_run` placed them (the run's own mesh
when this machine has its devices, else one device). One process: rank 0 of 1.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jaxtrain.data.sources import run_tokenizer
from jaxtrain.data.tokenizer import encode_text
from jaxtrain.model import sharding
from jaxtrain.run.scoring import Scorer
from jaxtrain.tools.generate import generate
from jaxtrain.tools.saved_run import load_run

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


def _rows(batch_size: int | str | None, train_batch: int, shards: int) -> int:
    """lm-eval's batch size -> rows per forward: a positive multiple of `shards`."""
    if batch_size is None or str(batch_size).startswith("auto"):
        wanted = train_batch
    else:
        wanted = int(batch_size)
        if wanted < 1:
            raise ValueError(f"batch_size {batch_size}: expected a positive integer or 'auto'")
    return -(-wanted // shards) * shards


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cut_generation(tokens: list[int], eot: int, decode, until: list[str]) -> str:
    """Generated ids -> text: up to the first end-of-document id, then up to the first
    occurrence of any stop string (HFLM's postprocessing; an empty stop string is none)."""
    if eot in tokens:
        tokens = tokens[:tokens.index(eot)]
    text = decode(tokens)
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model("jaxtrain")
class JaxtrainLM(TemplateLM):
    """A jaxtrain checkpoint as an lm-eval model (module docstring)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None,
                 max_batch_size: int | None = None):
        super().__init__()
        del device, max_batch_size  # lm-eval passes both; the run's mesh places the parameters
        self.run = load_run(workdir, None if step in (None, "") else int(step))
        self.tokenizer_ = run_tokenizer(self.run.cfg)
        mesh = self.run.mesh
        rows = _rows(batch_size, self.run.cfg.train.batch_size, sharding.batch_shards(mesh.shape))
        self.scorer = Scorer(self.run.spec, mesh, self.run.cfg.data.seq_len, rows)
        self._max_gen_toks = int(max_gen_toks)
        self._workdir = str(workdir)
        log.info("jaxtrain %s step %d on %d device(s) (mesh %s), %d rows of %d tokens per forward",
                 workdir, self.run.step, mesh.size, dict(mesh.shape), rows, self.max_length)

    # -- what TemplateLM and the evaluator read ------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer_.eos_id)

    @property
    def max_length(self) -> int:
        return int(self.run.cfg.data.seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"jaxtrain-{self.tokenizer_.kind}-{self.tokenizer_.vocab_size}"

    def get_model_info(self) -> dict:
        return {"workdir": self._workdir, "step": self.run.step, "tokens_seen": self.run.tokens,
                "model_num_parameters": int(sum(np.prod(a.shape) for a in jax.tree.leaves(self.run.params)))}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode_text(self.tokenizer_, string).tolist()

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    # -- scoring ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.scorer.continuations(self.run.params, [(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        documents = [self.tok_encode(text) for text in tqdm(texts, desc="Tokenizing", disable=disable_tqdm)]
        totals = self.scorer.rolling(self.run.params, documents, self.prefix_token_id)
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # -- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple[int, int], list[tuple[int, list[int], list[str]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_gen_toks = self._gen_settings(gen_kwargs)
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no context: max_length is {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
            groups[len(ids), max_gen_toks].append((i, ids, until))
        out: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (_, max_gen_toks), members in sorted(groups.items(), reverse=True):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                rows = [ids for _, ids, _ in chunk]
                rows += rows[-1:] * (_power_of_two(len(rows)) - len(rows))  # fewer batch shapes to compile
                new = np.asarray(generate(self.run.model(), np.asarray(rows, np.int32), max_new_tokens=max_gen_toks,
                                          temperature=0))
                for (i, _, until), tokens in zip(chunk, new.tolist()):
                    out[i] = cut_generation(tokens, self.eot_token_id, self.tok_decode, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                progress.update(len(chunk))
        progress.close()
        return out

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """A request's stop strings (with the end-of-document text, as HFLM) and token budget."""
        kwargs = dict(gen_kwargs or {})
        if kwargs.get("do_sample"):
            raise ValueError(f"the jaxtrain model type decodes greedily; got {gen_kwargs}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eot = self.tok_decode([self.eot_token_id])
        if eot not in until:
            until.append(eot)
        budget = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs),
                      self.max_gen_toks)
        return until, int(budget)


