"""Mixture-of-experts models in and out as Hugging Face Qwen3-MoE (jaxtrain/huggingface/moe.py):
`transformers` (PyTorch, float32) loads an export and computes jaxtrain's logits and greedy
tokens under muP (router, readout, embedding and attention multipliers folded) and
CompleteP with raw top-k gates; a Qwen3-MoE model `transformers` creates imports with its
logits; what either side cannot hold is one line naming the key or field."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY, cli_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.data.sources import run_tokenizer
from jaxtrain.huggingface.importer import imported_params
from jaxtrain.model.transformer import forward_sown
from jaxtrain.run.loop import run
from jaxtrain.tools.generate import generate
from jaxtrain.tools.saved_run import load_run
from test_huggingface import MUP, PROMPT, export, hf_greedy, hf_logits, hf_model, transformers_model, \
    validation_tokens

pytestmark = pytest.mark.slow

MOE = ["model.qk_norm=true", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=32"]
VARIANTS = {
    "mup": [*MOE, MUP],  # renormalized gates; router multiplier 1/m = 0.5
    "completep_raw": [*MOE, "model.moe.renormalize=false", "model.moe.top_k=1",
                      "parametrization={name: mup, d0: 32, L0: 1, depth_alpha: 1.0}"],
}
EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"


def max_difference(theirs, mine, atol: float, what: str) -> float:
    """Assert |theirs - mine| <= atol everywhere; print and return the largest difference."""
    largest = float(np.max(np.abs(np.asarray(theirs, np.float64) - np.asarray(mine, np.float64))))
    print(f"{what}: max |difference| {largest:.3g}")
    np.testing.assert_allclose(theirs, mine, atol=atol, rtol=0, err_msg=what)
    return largest


@pytest.fixture(scope="module")
def moe_trained(tmp_path_factory):
    """variant -> a workdir trained 12 steps, made on first use."""
    workdirs = {}

    def get(variant: str):
        if variant not in workdirs:
            workdir = tmp_path_factory.mktemp(variant)
            run(load_config(TINY, ["train.steps=12", "train.eval_every=12", *VARIANTS[variant]]), workdir,
                console=False)
            workdirs[variant] = workdir
        return workdirs[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_computes_the_exported_moe_logits_and_greedy_tokens(variant, moe_trained, tmp_path, capsys):
    workdir, out = moe_trained(variant), tmp_path / "hf"
    export(capsys, workdir, out)
    saved = load_run(workdir)
    moe = saved.cfg.model.moe
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"],
            config["norm_topk_prob"], config["decoder_sparse_step"]) == (4, moe.top_k, 32, moe.renormalize, 1)
    factors = json.loads((out / "jaxtrain_export.json").read_text())["folded_factors"]
    assert factors["blocks.mlp.router"] == pytest.approx(0.5)  # muP's 1/m, m = 64/32
    assert factors.get("blocks.mlp.w_down") == (0.5 if variant == "completep_raw" else None)  # residual 1/r
    model = hf_model(out)
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)

    tokens = validation_tokens(saved.cfg)[:4, :-1]
    mine = np.asarray(jax.jit(lambda m, t: m(t))(saved.model(), tokens))
    max_difference(hf_logits(model, tokens), mine, 1e-4, f"{variant} export, transformers vs jaxtrain logits")

    prompt = run_tokenizer(saved.cfg).encode_documents([PROMPT.encode()])[0].astype(np.int32)[None]
    theirs = hf_greedy(model, prompt, 32)
    np.testing.assert_array_equal(theirs, np.asarray(generate(saved.model(), prompt, max_new_tokens=32,
                                                               temperature=0)))


def test_the_router_chooses_differently_per_token_so_the_expert_order_is_tested(moe_trained, capsys):
    """Were every token routed to the same experts, a permuted expert order would not show."""
    saved = load_run(moe_trained("mup"))
    tokens = validation_tokens(saved.cfg)[:4, :-1]
    sown = jax.jit(lambda m, t: forward_sown(m, t, {"router_load"})[1])(saved.model(), tokens)
    load = np.asarray(jax.tree.leaves(sown)[0])  # (layers, experts) fraction of assignments
    assert load.shape == (2, 4) and (load > 0.05).all(), load


def test_moe_export_then_import_gives_back_the_model(moe_trained, tmp_path, capsys):
    workdir = moe_trained("mup")
    export(capsys, workdir, tmp_path / "hf")
    saved = load_run(workdir)
    params = jax.device_get(saved.params)
    back = imported_params(saved.cfg, saved.spec.table, params, tmp_path / "hf")
    for name in ("router", "w_gate", "w_down"):
        np.testing.assert_allclose(back["blocks"]["mlp"][name], params["blocks"]["mlp"][name], rtol=1e-6, atol=0)
    tokens = validation_tokens(saved.cfg)[:4, :-1]
    logits = jax.jit(lambda p, t: ts.bind_model(saved.spec, p)(t))
    max_difference(logits(back, tokens), logits(params, tokens), 1e-5, "export -> import, jaxtrain logits")


def transformers_moe(directory, seed: int = 0, **overrides):
    """A Qwen3-MoE model `transformers` creates with random weights, saved to `directory`
    (as save_pretrained writes it: per-expert tensors, `num_local_experts`)."""
    return transformers_model(directory, "qwen3_moe", seed, **{
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
        **overrides})


@pytest.mark.parametrize("renormalize, settings", [(True, []), (False, [MUP])])
def test_a_transformers_moe_model_imports_with_its_logits(renormalize, settings, tmp_path, capsys):
    theirs = transformers_moe(tmp_path / "hf", norm_topk_prob=renormalize)
    assert "num_local_experts" in json.loads((tmp_path / "hf" / "config.json").read_text())
    workdir = tmp_path / "imported"
    status, _, err = cli_in_process(capsys, "import", str(tmp_path / "hf"), "--workdir", str(workdir),
                                    "--config", str(TINY), *[a for s in settings for a in ("--set", s)])
    assert status == 0, err
    saved = load_run(workdir)
    moe = saved.cfg.model.moe
    assert (moe.n_experts, moe.top_k, moe.expert_d_ff, moe.renormalize, moe.n_shared_experts) == (4, 2, 32,
                                                                                                  renormalize, 0)
    assert saved.cfg.model.qk_norm and saved.cfg.model.d_ff == 192
    tokens = validation_tokens(saved.cfg)[:4, :-1]
    mine = np.asarray(jax.jit(lambda m, t: m(t))(saved.model(), tokens))
    max_difference(mine, hf_logits(theirs, tokens), 1e-4, f"import (norm_topk_prob={renormalize}), logits")


def one_step_run(tmp_path, *settings):
    workdir = tmp_path / "run"
    settings = ["train.steps=1", "train.eval_every=1", "schedule.warmup_steps=0", *settings]
    run(load_config(TINY, settings), workdir, console=False)
    return workdir


@pytest.mark.parametrize("settings, key", [
    ([*MOE, "model.moe.n_shared_experts=1"], "model.moe.n_shared_experts"),
    ([*MOE[1:]], "model.qk_norm"),
])
def test_export_refuses_what_qwen3_moe_cannot_compute_in_one_line(settings, key, tmp_path, capsys):
    workdir = one_step_run(tmp_path, *settings)
    status, _, err = cli_in_process(capsys, "export", str(workdir), "--out", str(tmp_path / "hf"))
    assert status == 2 and f"config key '{key}'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()


def _edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, field", [
    ("decoder_sparse_step", "decoder_sparse_step"),  # layer 0 dense, layer 1 sparse
    ("mlp_only_layers", "mlp_only_layers"),
    ("num_experts", "num_experts"),  # two spellings of the expert count that disagree
    ("num_experts_per_tok", "num_experts_per_tok"),
])
def test_qwen3_moe_models_jaxtrain_cannot_hold_are_one_line_naming_the_field(case, field, tmp_path, capsys):
    source = tmp_path / "hf"
    if case == "decoder_sparse_step":
        transformers_moe(source, decoder_sparse_step=2)
    elif case == "mlp_only_layers":
        transformers_moe(source, mlp_only_layers=[0])
    else:
        transformers_moe(source)
        _edit_config(source, **({"num_experts": 8} if case == "num_experts" else {"num_experts_per_tok": 5}))
    for args in (["import", str(source), "--workdir", str(tmp_path / "imported"), "--config", str(TINY)],
                 ["train", str(TINY), "--workdir", str(tmp_path / "continued"),
                  "--set", f"train.init_from={{huggingface: {source}}}"]):
        status, _, err = cli_in_process(capsys, *args)
        assert status == 2 and f"config.json field '{field}'" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "imported").exists() and not (tmp_path / "continued").exists()


@pytest.mark.parametrize("source, settings, key", [
    ("moe", [*MOE, "model.moe.top_k=1"], "model.moe.top_k"),
    ("moe", [*MOE, "model.moe.expert_d_ff=16"], "model.moe.expert_d_ff"),
    ("moe", ["model.qk_norm=true"], "model.moe.n_experts"),  # a dense config, a MoE source
    ("dense", MOE, "model.moe.n_experts"),  # a MoE config, a dense source
])
def test_init_from_a_model_of_other_experts_names_the_moe_key(source, settings, key, tmp_path, capsys):
    if source == "moe":
        transformers_moe(tmp_path / "hf")
    else:
        transformers_model(tmp_path / "hf", "qwen3")
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path / "run"),
                                    *[a for s in [*settings, f"train.init_from={{huggingface: {tmp_path / 'hf'}}}"]
                                      for a in ("--set", s)])
    assert status == 2 and f"config key '{key}'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
