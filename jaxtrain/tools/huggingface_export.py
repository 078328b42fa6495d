"""`jaxtrain export`: a checkpoint as a Hugging Face model directory.

    jaxtrain export runs/small --out exported/small [--step N] [--dtype float32|bfloat16]

writes what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load with no custom code:

    config.json              LlamaForCausalLM, or Qwen3ForCausalLM under model.qk_norm, or
                             Qwen3MoeForCausalLM under model.moe (jaxtrain/huggingface/moe.py)
    model.safetensors        (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    generation_config.json   end-of-document token; greedy unless asked otherwise
    tokenizer.json, tokenizer_config.json
    jaxtrain_export.json     the source run and step, and every factor folded into the weights

The directory is written under a temporary name beside `--out` and renamed when complete,
so an interrupted or refused export leaves nothing at `--out` (missing parent directories
are created); an existing `--out` is never overwritten. Nothing in the workdir is written.
The temporary directory is owned by its exporter (jaxtrain/tools/staging.py): a killed
export's leftover (`.OUT.staging-*`) is removed by the next export to the same `--out`,
while a running export's is left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxtrain.config.errors import UserError
from jaxtrain.data.sources import run_tokenizer
from jaxtrain.huggingface import architecture, files, weights
from jaxtrain.model.parametrization import path_str
from jaxtrain.tools.staging import Staging
from jaxtrain.tools.saved_run import load_run

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size


def check_out(out: Path) -> None:
    if out.exists():
        raise UserError(f"--out {out}: already exists (export writes a new directory)")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is not a directory")
            break


def export_run(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "float32",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
    """Export checkpoint `step` (default: newest) of `workdir` to the new directory `out`;
    returns what jaxtrain_export.json records."""
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"--max-shard-size {max_shard_bytes}: must be positive")
    check_out(out)
    run = load_run(workdir, step)
    cfg, table = run.cfg, run.spec.table
    architecture.check_exportable(cfg.model, "jaxtrain export")
    tokenizer = run_tokenizer(cfg)
    flat = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(run.params))}
    factors = weights.fold_factors(table, cfg.model)
    record = {
        "source": {"workdir": str(Path(workdir).absolute()), "step": run.step, "tokens": run.tokens},
        "architecture": architecture.ARCHITECTURES[architecture.family(cfg.model)],
        "dtype": dtype,
        "parametrization": {"name": table.name, "width_mult": table.width_mult, "depth_mult": table.depth_mult},
        "attention_logit_scale": {"jaxtrain": table.forward.attn_scale,
                                  "huggingface": cfg.model.head_dim ** -0.5},
        "residual_multiplier": table.forward.residual,
        # hf tensor = factor * jaxtrain parameter (jaxtrain/huggingface/weights.py)
        "folded_factors": {path: factor for path, factor in factors.items() if factor != 1.0},
    }
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)  # as save_pretrained does
    except OSError as err:
        raise UserError(f"--out {out}: cannot create its directory ({err.strerror})") from None
    with Staging(out, "export") as staging:
        tensors = weights.to_hf(flat, table, cfg.model, factors, DTYPES[dtype])
        written = files.write_weights(staging, tensors, max_shard_bytes)
        config = architecture.hf_config(cfg.model, max_positions=cfg.data.seq_len, eos_id=tokenizer.eos_id,
                                        dtype=dtype)
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json",
                    {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "do_sample": False})
        written += files.write_tokenizer(staging, tokenizer, cfg.data.seq_len)
        record["files"] = sorted([*written, "config.json", "generation_config.json", "jaxtrain_export.json"])
        _write_json(staging / "jaxtrain_export.json", record)
        _usual_permissions(staging)
    return record


def _usual_permissions(directory: Path) -> None:
    """safetensors writes private files: give them (and the directory) the permissions of
    any file this process creates (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
