"""Looking at finished runs: eval, generate (KV cache vs recompute), plot, the notebook.

Two tiny runs are trained once: one on the default 8-device fsdp mesh, one on a
data=2 x fsdp=2 x tensor=2 mesh. Both are read back on other meshes (the notebook
kernel has a single CPU device).
"""

import base64
import dataclasses
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, cli_in_process, figure_panels, logged_rows, run_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.config.schema import MeshConfig
from jaxtrain.data import pipeline
from jaxtrain.data.corpus import load_corpus
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources, run_tokenizer
from jaxtrain.data.tokenizer import ByteTokenizer, encode_text
from jaxtrain.tools import inspection
from jaxtrain.tools.evaluate_checkpoint import evaluate_run
from jaxtrain.tools.generate import generate
from reference_decoding import generate_by_recompute
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics
from jaxtrain.tools.saved_run import load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'fsdp8': workdir, 'dp2_fsdp2_tp2': workdir}, each a finished tiny run: the first on
    byte tokens, the second on a BPE store with documents packed (what the notebook reads
    must assume neither bytes nor one document per window)."""
    store = tmp_path_factory.mktemp("bpe") / "store"
    prepare(["{stdlib}/json/*.py", "{stdlib}/asyncio/*.py"], str(store), "bpe:512", val_fraction=0.1)
    bpe = [f"data.sources=[{{path: '{store}'}}]", "model.vocab_size=512", "data.packing=true"]
    workdirs = {}
    for name, overrides in [("fsdp8", []), ("dp2_fsdp2_tp2", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *bpe])]:
        workdirs[name] = tmp_path_factory.mktemp(name)
        run(load_config(TINY, overrides), workdirs[name], console=False)
    return workdirs


def logged_row(workdir, step):
    return next(r for r in read_metrics(workdir / "metrics.jsonl") if r["step"] == step)


def logged_val_loss(workdir, step):
    return logged_row(workdir, step)["val_loss"]


def test_eval_cli_reproduces_the_logged_validation_loss(runs, capsys):
    workdir = runs["fsdp8"]
    result = run_in_process(capsys, "eval", str(workdir), "--step", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    logged = logged_val_loss(workdir, 20)
    assert report["step"] == 20 and report["tokens_seen"] == 20 * 16 * 64
    assert report["val_loss"] == pytest.approx(logged, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]))
    # byte tokens: one per byte plus one end token per document
    corpus = load_corpus(tuple(load_config(TINY).data.paths), load_config(TINY).data.val_fraction)
    tokens_per_byte = (corpus.val_bytes + corpus.n_val_docs) / corpus.val_bytes
    assert report["bits_per_byte"] == pytest.approx(report["val_loss"] / math.log(2) * tokens_per_byte)
    assert report["bits_per_byte"] == pytest.approx(logged_row(workdir, 20)["val_bits_per_byte"], rel=1e-5)


def test_eval_counts_only_the_targets_its_loss_averages_over(runs):
    """Under data.packing the target that starts a new document is not in the loss, so it is
    not in val_tokens either."""
    loaded = load_run(runs["fsdp8"])
    cfg = loaded.cfg
    packed_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": True})})
    windows = pipeline.validation_batches(packed_cfg, open_sources(packed_cfg)[0])
    targets = len(windows) * cfg.train.batch_size * cfg.data.seq_len
    boundaries = sum(int(np.sum(w["segment_ids"][:, 1:] != w["segment_ids"][:, :-1])) for w in windows)
    assert boundaries > 0
    assert evaluate_run(loaded)["val_tokens"] == targets
    assert evaluate_run(dataclasses.replace(loaded, cfg=packed_cfg))["val_tokens"] == targets - boundaries


def test_eval_on_another_mesh_matches_the_log(runs):
    """Written on data2 x fsdp2 x tensor2, evaluated on fsdp4 x tensor2 and on one device."""
    workdir = runs["dp2_fsdp2_tp2"]
    logged = logged_val_loss(workdir, 40)
    for mesh in (MeshConfig(data=1, fsdp=4, tensor=2), None):
        loaded = load_run(workdir, mesh_cfg=mesh)
        assert loaded.step == 40
        assert evaluate_run(loaded)["val_loss"] == pytest.approx(logged, rel=1e-5)


def test_eval_and_generate_bad_input_is_one_line(runs, tmp_path, capsys):
    cases = [("eval", str(runs["fsdp8"]), "--step", "25"),
             ("eval", str(tmp_path)),
             ("generate", str(runs["fsdp8"]), "--prompt", ""),
             ("generate", str(runs["fsdp8"]), "--prompt", "x", "--temperature", "-1")]
    for args in cases:
        status, _, err = cli_in_process(capsys, *args)
        assert status == 2, args
        assert err.count("\n") == 1 and err.startswith("jaxtrain: error:"), err
    assert "saved: [20, 30, 40]" in cli_in_process(capsys, *cases[0])[2]


def test_generate_is_deterministic_for_a_seed(runs, capsys):
    args = ("generate", str(runs["fsdp8"]), "--prompt", "def ", "--max-new-tokens", "24", "--top-k", "20")
    first, again = cli_in_process(capsys, *args, "--seed", "3"), cli_in_process(capsys, *args, "--seed", "3")
    other = cli_in_process(capsys, *args, "--seed", "4")
    assert first[0] == 0, first[2]
    assert first[1] == again[1] and first[1].startswith("def ")
    assert first[1] != other[1]


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.7, 5)])
def test_kv_cache_draws_the_same_tokens_as_recomputing_the_sequence(runs, temperature, top_k):
    model = load_run(runs["fsdp8"]).model()
    prompt = jnp.asarray(np.stack([encode_text(ByteTokenizer(), text) for text in ("import os\nde", "class A:\n  b")]))
    kwargs = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, seed=11)
    cached = generate(model, prompt, **kwargs)
    assert cached.shape == (2, 20)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(generate_by_recompute(model, prompt, **kwargs)))


def test_kv_cache_logits_equal_full_forward_with_qk_norm_and_mup():
    cfg = load_config(TINY, ["model.qk_norm=true", "parametrization.name=mup", "parametrization.d0=32",
                             "model.n_kv_heads=1"])
    spec = ts.model_spec(cfg)
    model = ts.bind_model(spec, ts.init_params(cfg, spec, jax.random.PRNGKey(1)))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 256)
    full = model(tokens)
    caches = model.empty_caches(2, 16)
    prefill, caches = model.decode(tokens[:, :7], caches)
    pieces = [prefill]
    for t in range(7, 12):
        logits, caches = model.decode(tokens[:, t:t + 1], caches)
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), atol=2e-5)
    assert int(caches[0].length) == 12


def test_attention_maps_reproduce_the_attention_output(runs):
    loaded = load_run(runs["fsdp8"])
    model = loaded.model()
    tokens = jnp.asarray(inspection.sample_batch(loaded, 2)[:, :32])
    maps = inspection.attention_maps(model, tokens)
    assert len(maps) == loaded.cfg.model.n_layers and maps[0].shape == (2, 4, 32, 32)
    np.testing.assert_allclose(np.asarray(maps[0].sum(-1)), 1.0, atol=1e-5)
    assert float(jnp.triu(maps[0], k=1).max()) == 0.0  # causal
    block = model.layer(0)
    x = block.attn_norm(model.embed_tokens(tokens))
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    _, _, v = block.attn._qkv(x, positions)
    v = jnp.repeat(v, 2, axis=2)  # 4 query heads share 2 kv heads
    by_hand = jnp.einsum("bnts,bsnh,nhd->btd", maps[0], v, block.attn.wo[...])
    np.testing.assert_allclose(np.asarray(by_hand), np.asarray(block.attn(x, positions)[0]), atol=2e-5)


def test_attention_maps_of_a_packed_run_stay_inside_each_document(runs):
    loaded = load_run(runs["dp2_fsdp2_tp2"])
    tokens, segment_ids = ts.model_inputs(inspection.sample_batch(loaded, 16))
    assert tokens.shape == segment_ids.shape == (16, 64)
    segments = jnp.asarray(segment_ids)
    maps = inspection.attention_maps(loaded.model(), jnp.asarray(tokens), segments)
    other_document = segments[:, None, :, None] != segments[:, None, None, :]  # (B, 1, query, key)
    assert bool(other_document.any())  # the sample does cross a document boundary
    for layer in maps:
        assert float(jnp.where(other_document, layer, 0.0).max()) == 0.0
        np.testing.assert_allclose(np.asarray(layer.sum(-1)), 1.0, atol=1e-5)


def test_plot_overlays_runs_and_rejects_unknown_metrics(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    result = run_in_process(capsys, "plot", str(runs["fsdp8"]), str(runs["dp2_fsdp2_tp2"]), "--out", str(out),
                     "--metric", "loss,val_loss,lr", "--x", "tokens")
    assert result.returncode == 0, result.stderr
    panels = figure_panels(out)  # a panel per metric over tokens, a curve per run with its logged points
    assert [(p["title"], p["x"]) for p in panels] == [("loss", "tokens"), ("val_loss", "tokens"), ("lr", "tokens")]
    for panel in panels:
        assert panel["curves"] == {runs[name].name: sum(panel["title"] in row for row in logged_rows(runs[name]))
                                   for name in ("fsdp8", "dp2_fsdp2_tp2")}
    bad = run_in_process(capsys, "plot", str(runs["fsdp8"]), "--out", str(tmp_path / "x.png"), "--metric", "nope")
    assert bad.returncode == 2 and "--metric nope" in bad.stderr and not (tmp_path / "x.png").exists()


def test_notebook_runs_headless_on_one_device(runs, monkeypatch):
    """Executed once, on the run of the three-axis mesh (the harder reshard to one device;
    the fsdp run's reads on other meshes are checked above)."""
    name = "dp2_fsdp2_tp2"
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / "inspect.ipynb", as_version=4)
    # the kernel inherits this environment: one CPU device, not the tests' eight
    monkeypatch.setenv("JAXTRAIN_WORKDIR", str(runs[name]))
    monkeypatch.setenv("JAXTRAIN_STEP", "30")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags)) if flags else monkeypatch.delenv("XLA_FLAGS", raising=False)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "step 30 of 40" in text and "loaded on {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1} (1 cpu devices)" in text
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # curves, singular values, activations, attention maps
    sizes = [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))).size for o in images]
    assert sizes[0][0] > 3 * sizes[0][1] and sizes[3][0] > 1.5 * sizes[3][1], sizes  # 4 panels wide; 2 maps
    assert text.count("--- seed") == 2
    samples = text[text.index("--- seed 0"):]
    assert "\ufffd" not in samples  # BPE ids read as bytes would decode to U+FFFD
    prompt_ids = encode_text(run_tokenizer(load_config(runs[name] / "config.yaml")), "def ").tolist()
    assert prompt_ids != list(b"def ")  # the run's BPE, not bytes, encodes the prompt
    assert f"prompt 'def ': token ids {prompt_ids}" in text
