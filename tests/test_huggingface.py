"""Models in and out as Hugging Face checkpoints: `transformers` (PyTorch, float32) loads an
export and computes jaxtrain's logits and greedy tokens under SP, muP with non-default
multipliers, CompleteP, GQA and QK-norm; models that `transformers` creates import with
their logits, and continue pretraining from their own loss; bad inputs are one line."""

import json
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch  # the test extras' CPU PyTorch and transformers: the consumers an export is for
import transformers

from conftest import TINY, cli_in_process, start_cli
from jaxtrain import cli
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.data import pipeline
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources, run_tokenizer
from jaxtrain.huggingface.importer import imported_params
from jaxtrain.run.loop import run
from jaxtrain.tools.generate import generate
from jaxtrain.tools.saved_run import load_run
from jaxtrain.tools.staging import Staging


pytestmark = pytest.mark.slow

MUP = "parametrization={name: mup, d0: 32, embed_multiplier: 3.0, output_multiplier: 0.5, attn_scale: inv}"
VARIANTS = {  # tiny.yaml has GQA (4 query heads, 2 kv heads) in every variant
    "sp": [],
    "mup": [MUP],
    "completep": ["parametrization={name: mup, d0: 32, L0: 1, depth_alpha: 1.0}"],
    "qk_norm": [MUP, "model.qk_norm=true"],
    "bpe": ["model.vocab_size=512"],  # and the data of a BPE store (`trained`)
}
PROMPT = "def __init__(self"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """variant -> a workdir trained 12 steps, made on first use."""
    workdirs = {}

    def get(variant: str):
        if variant not in workdirs:
            workdir, settings = tmp_path_factory.mktemp(variant), list(VARIANTS[variant])
            if variant == "bpe":
                store = tmp_path_factory.mktemp("bpe_store") / "store"
                prepare(["{stdlib}/json/*.py", "{stdlib}/asyncio/*.py"], str(store), "bpe:512", val_fraction=0.1)
                settings.append(f"data.sources=[{{path: '{store}'}}]")
            run(load_config(TINY, ["train.steps=12", "train.eval_every=12", *settings]), workdir, console=False)
            workdirs[variant] = workdir
        return workdirs[variant]

    return get


def export(capsys, workdir, out, *args):
    status, printed, err = cli_in_process(capsys, "export", str(workdir), "--out", str(out), *args)
    assert status == 0, err
    return printed


def hf_model(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    # no stop token: `jaxtrain generate` runs on past an end of document, as sampling from
    # the training distribution does (the exported generation_config.json stops there)
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                           pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt, dtype=torch.long), generation_config=config)
    return out[:, prompt.shape[1]:].numpy()


def validation_tokens(cfg, batches: int = 1) -> np.ndarray:
    """The run's first validation batches (inputs and targets), as the evaluator reads them."""
    source = open_sources(cfg)[0]
    return np.concatenate(pipeline.validation_batches(cfg, source)[:batches])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_computes_the_exported_logits_and_greedy_tokens(variant, trained, tmp_path, capsys):
    workdir = trained(variant)
    out = tmp_path / "hf"
    printed = export(capsys, workdir, out)
    saved = load_run(workdir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM" if variant == "qk_norm" else "LlamaForCausalLM"]
    assert config["vocab_size"] == saved.cfg.model.vocab_size
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    record = json.loads((out / "jaxtrain_export.json").read_text())
    assert (record["folded_factors"] == {}) == (variant in ("sp", "bpe")), printed
    model = hf_model(out)

    tokens = validation_tokens(saved.cfg)[:4, :-1]
    want = np.asarray(jax.jit(lambda m, t: m(t))(saved.model(), tokens))
    np.testing.assert_allclose(hf_logits(model, tokens), want, atol=1e-4, rtol=0)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = run_tokenizer(saved.cfg).encode_documents([PROMPT.encode()])[0].astype(np.int32)[None]
    assert tokenizer(PROMPT)["input_ids"] == prompt[0].tolist()
    theirs = hf_greedy(model, prompt, 32)
    mine = np.asarray(generate(saved.model(), prompt, max_new_tokens=32, temperature=0))
    np.testing.assert_array_equal(theirs, mine)
    if variant == "qk_norm":  # the command itself, once: the same function as `generate` above
        status, text, err = cli_in_process(capsys, "generate", str(workdir), "--prompt", PROMPT,
                                           "--max-new-tokens", "32", "--temperature", "0")
        assert status == 0, err
        assert text.rstrip("\n") == PROMPT + tokenizer.decode(theirs[0])


def test_byte_tokenizer_round_trips_every_text(trained, tmp_path, capsys):
    export(capsys, trained("sp"), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "naïve café ☃ Ā \x00 end\n\tdef f(): return 1"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # jaxtrain's byte ids, the end-of-document NUL included
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 0


@pytest.mark.parametrize("variant", ["sp", "mup", "completep"])
def test_export_then_import_gives_back_the_model(variant, trained, tmp_path, capsys):
    workdir = trained(variant)
    export(capsys, workdir, tmp_path / "hf")
    saved = load_run(workdir)
    params = jax.device_get(saved.params)
    back = imported_params(saved.cfg, saved.spec.table, params, tmp_path / "hf")
    if variant == "sp":  # every factor is 1: the weights are copied bit for bit
        jax.tree.map(np.testing.assert_array_equal, back, params)
    tokens = validation_tokens(saved.cfg)[:4, :-1]
    logits = jax.jit(lambda p, t: ts.bind_model(saved.spec, p)(t))
    np.testing.assert_allclose(logits(back, tokens), logits(params, tokens), atol=1e-5, rtol=0)


def test_large_exports_are_sharded_with_an_index_and_bfloat16_rounds_the_weights(trained, tmp_path, capsys):
    workdir = trained("mup")
    export(capsys, workdir, tmp_path / "f32")
    export(capsys, workdir, tmp_path / "sharded", "--max-shard-size", "100KB")
    export(capsys, workdir, tmp_path / "bf16", "--dtype", "bfloat16")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    from safetensors.numpy import load_file

    whole = load_file(tmp_path / "f32" / "model.safetensors")
    pieces = {k: v for shard in shards for k, v in load_file(tmp_path / "sharded" / shard).items()}
    assert sorted(pieces) == sorted(whole) == sorted(index["weight_map"])
    assert all(np.array_equal(pieces[k], whole[k]) for k in whole)
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    for name, value in whole.items():  # rounded once, from the float64 product, to bfloat16's 8 bits
        assert half[name].dtype.name == "bfloat16"
        np.testing.assert_allclose(half[name].astype(np.float32), value, rtol=2**-8, atol=0, err_msg=name)
    tokens = validation_tokens(load_run(workdir).cfg)[:2, :-1]
    np.testing.assert_allclose(hf_logits(hf_model(tmp_path / "sharded"), tokens),
                               hf_logits(hf_model(tmp_path / "f32"), tokens), atol=0, rtol=0)


def transformers_model(directory, family: str, seed: int = 0, **overrides):
    """A model `transformers` creates from a config with random weights, saved to `directory`."""
    torch.manual_seed(seed)
    fields = {**dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     max_position_embeddings=64, initializer_range=0.1), **overrides}
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **fields))
    elif family == "qwen3_moe":  # tests/test_huggingface_moe.py
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(head_dim=16, **fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    with torch.no_grad():  # norm gains away from 1, so a misplaced gain shows
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("family, settings", [("llama", []), ("qwen3", [MUP])])
def test_transformers_models_import_with_their_logits(family, settings, tmp_path, capsys):
    theirs = transformers_model(tmp_path / "hf", family)
    workdir = tmp_path / "imported"
    status, out, err = cli_in_process(capsys, "import", str(tmp_path / "hf"), "--workdir", str(workdir),
                                      "--config", str(TINY), *[a for s in settings for a in ("--set", s)])
    assert status == 0, err
    saved = load_run(workdir)
    assert saved.step == 0 and saved.cfg.model.qk_norm == (family == "qwen3")
    tokens = validation_tokens(saved.cfg)[:4, :-1]
    mine = np.asarray(jax.jit(lambda m, t: m(t))(saved.model(), tokens))
    np.testing.assert_allclose(mine, hf_logits(theirs, tokens), atol=1e-4, rtol=0)


def test_continued_pretraining_starts_at_the_models_loss_and_lowers_it(tmp_path, capsys):
    theirs = transformers_model(tmp_path / "hf", "llama", seed=1)
    workdir = tmp_path / "continued"
    status, out, err = cli_in_process(capsys, "import", str(tmp_path / "hf"), "--workdir", str(workdir),
                                      "--config", str(TINY), "--set", "train.steps=20", "--set", "train.eval_every=20")
    assert status == 0, err
    cfg = load_run(workdir).cfg
    batches = validation_tokens(cfg, batches=cfg.data.val_batches)
    log_probs = torch.log_softmax(torch.tensor(hf_logits(theirs, batches[:, :-1])), dim=-1)
    hf_loss = -log_probs.gather(-1, torch.tensor(batches[:, 1:], dtype=torch.long)[..., None]).mean().item()
    step0 = json.loads(cli_in_process(capsys, "eval", str(workdir))[1])
    assert step0["step"] == 0
    assert step0["val_loss"] == pytest.approx(hf_loss, abs=1e-4)
    assert f"val_loss {step0['val_loss']:.4f}" in out
    status, _, err = cli_in_process(capsys, "train", str(workdir / "config.yaml"), "--workdir", str(workdir))
    assert status == 0, err
    after = json.loads(cli_in_process(capsys, "eval", str(workdir))[1])
    assert after["step"] == 20 and after["val_loss"] < step0["val_loss"] - 0.1


def _bad_sources(tmp_path):
    """(name, directory, the word the error must name) of models jaxtrain cannot import."""
    cases = [("tied", transformers_model(tmp_path / "tied", "llama", tie_word_embeddings=True), "tie_word_embeddings"),
             ("bias", transformers_model(tmp_path / "bias", "llama", attention_bias=True), "attention_bias"),
             ("vocab", transformers_model(tmp_path / "vocab", "llama", vocab_size=128), "vocab_size")]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    gpt2.save_pretrained(tmp_path / "gpt2")
    return [(name, tmp_path / name, word) for name, _, word in cases] + [("gpt2", tmp_path / "gpt2", "model_type")]


def test_unsupported_models_are_one_line_and_write_nothing(tmp_path, capsys):
    for name, directory, word in _bad_sources(tmp_path):
        workdir = tmp_path / f"into_{name}"
        status, _, err = cli_in_process(capsys, "import", str(directory), "--workdir", str(workdir),
                                        "--config", str(TINY))
        assert status == 2 and word in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not workdir.exists(), name
        # the same source named by train.init_from, with the tiny model: refused before the workdir exists
        status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                        "--set", f"train.init_from={{huggingface: {directory}}}")
        assert status == 2 and len(err.strip().splitlines()) == 1 and not workdir.exists(), (name, err)


def test_a_tokenizer_that_is_not_the_datas_is_refused(trained, tmp_path, capsys):
    export(capsys, trained("bpe"), tmp_path / "hf")
    workdir = tmp_path / "run"
    status, _, err = cli_in_process(capsys, "import", str(tmp_path / "hf"), "--workdir", str(workdir),
                                    "--config", str(TINY))  # byte data, a 512-token BPE model
    assert status == 2 and "train.init_from.huggingface" in err and "tokenizer" in err, err
    assert not workdir.exists()


def test_a_model_section_that_differs_from_the_source_is_named(tmp_path, capsys):
    transformers_model(tmp_path / "hf", "llama")
    workdir = tmp_path / "run"
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir), "--set", "model.d_model=32",
                                    "--set", f"train.init_from={{huggingface: {tmp_path / 'hf'}}}")
    assert status == 2 and "model.d_model" in err and "64" in err and not workdir.exists(), err
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                    "--set", f"train.init_from={{huggingface: {tmp_path / 'hf'}, step: 3}}")
    assert status == 2 and "train.init_from" in err and not workdir.exists(), err


def test_export_refuses_an_existing_or_unplaceable_out_and_writes_nothing_there(trained, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for out, word in [(existing, "already exists"), (existing / "keep.txt" / "hf", "is not a directory")]:
        status, _, err = cli_in_process(capsys, "export", str(trained("sp")), "--out", str(out))
        assert status == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no staging directory left behind
    export(capsys, trained("sp"), tmp_path / "new" / "dirs" / "hf")  # missing parents are made
    assert json.loads((tmp_path / "new" / "dirs" / "hf" / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
    status, _, err = cli_in_process(capsys, "export", str(trained("sp")), "--out", str(tmp_path / "hf"),
                                    "--step", "7")
    assert status == 2 and "--step 7" in err and not (tmp_path / "hf").exists()


# --- Never lose work, part three: the import boundary reads only what it can check, and a
# killed export or import leaves nothing that blocks or outlives the next one.

@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """An export of the tiny SP run (read-only: tests corrupt copies of it)."""
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert cli.main(["export", str(trained("sp")), "--out", str(out)]) == 0
    return out


def corrupt_copy(exported, directory, change_config=None, change_tensors=None):
    """A copy of `exported` with its config.json or its tensors changed."""
    shutil.copytree(exported, directory)
    if change_config:
        config = json.loads((directory / "config.json").read_text())
        change_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    if change_tensors:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def set_value(name, value):
    def change(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name].flat[3] = value
    return change


def header_dtype_to_i32(path, name):
    """Change one byte of the safetensors header: tensor `name` (F32) then reads as I32."""
    raw = bytearray(path.read_bytes())
    start = raw.index(f'"{name}":{{"dtype":"F32"'.encode()) + len(f'"{name}":{{"dtype":"'.encode())
    raw[start] = ord("I")
    path.write_bytes(bytes(raw))


def refused_both_ways(capsys, source, tmp_path, *words):
    """`jaxtrain import` and train.init_from.huggingface of `source` each exit 2 with one line
    holding `words`, and neither writes its workdir."""
    for args in (["import", str(source), "--workdir", str(tmp_path / "imported"), "--config", str(TINY)],
                 ["train", str(TINY), "--workdir", str(tmp_path / "continued"),
                  "--set", f"train.init_from={{huggingface: {source}}}"]):
        status, _, err = cli_in_process(capsys, *args)
        assert status == 2 and len(err.strip().splitlines()) == 1, (args[0], err)
        assert all(word in err for word in words), (args[0], words, err)
        assert not (tmp_path / "imported").exists() and not (tmp_path / "continued").exists()


UP = "model.layers.1.mlp.up_proj.weight"
BAD_TENSORS = {
    "int8": (lambda ts: ts.update({k: v.astype(np.int8) for k, v in ts.items()}), "dtype I8"),
    "nan": (set_value(UP, np.nan), "1 non-finite"),
    "inf": (set_value(UP, -np.inf), "1 non-finite"),
}


@pytest.mark.parametrize("case", [*BAD_TENSORS, "header"])
def test_weights_that_are_not_finite_floats_are_one_line_naming_file_and_tensor(case, exported, tmp_path, capsys):
    if case == "header":
        source = corrupt_copy(exported, tmp_path / "hf")
        header_dtype_to_i32(source / "model.safetensors", UP)
        words = [UP, "dtype I32"]
    else:
        change, word = BAD_TENSORS[case]
        source = corrupt_copy(exported, tmp_path / "hf", change_tensors=change)
        words = [word] if case == "int8" else [UP, word]
    refused_both_ways(capsys, source, tmp_path, str(source / "model.safetensors"), "tensor", *words)


@pytest.mark.parametrize("field, value, expected", [
    ("num_key_value_heads", "2", "valid integer"),
    ("rope_theta", None, "valid number"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": None}, "valid number"),
    ("rms_norm_eps", "1e-6", "valid number"),
    ("tie_word_embeddings", "false", "valid boolean"),
    ("hidden_size", 64.0, "valid integer"),
])
def test_config_json_fields_of_the_wrong_type_are_one_line(field, value, expected, exported, tmp_path, capsys):
    source = corrupt_copy(exported, tmp_path / "hf", change_config=lambda config: config.update({field: value}))
    name = field + (".rope_theta" if field == "rope_parameters" else "")
    refused_both_ways(capsys, source, tmp_path, f"{source}/config.json field '{name}'", expected)


def test_a_truncated_tokenizer_json_is_one_line_naming_it(exported, tmp_path, capsys):
    source = corrupt_copy(exported, tmp_path / "hf")
    tokenizer = source / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:1000])
    refused_both_ways(capsys, source, tmp_path, str(tokenizer))


def stop(proc) -> None:
    """SIGSTOP `proc` and wait until it is stopped (the signal is delivered asynchronously)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] not in "TtZ":  # Z: it ended
        time.sleep(0.0001)


def kill_when(proc, condition, timeout=300):
    """SIGKILL `proc` at a moment `condition()` holds: the process runs in ~1 ms slices and
    is looked at while stopped, so a state that lasts longer than a slice is never missed
    (an export's staging directory lives ~30 ms with 20KB shards, an import's workdir
    seconds)."""
    deadline = time.time() + timeout
    try:
        while True:
            stop(proc)
            if condition():
                break
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_exports_staging_directory_is_removed_by_the_next_export(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    staged = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf."))
    owned = lambda: any((tmp_path / name / ".owner").exists() for name in staged())  # its writer named in it
    kill_when(start_cli("export", str(trained("sp")), "--out", str(out), "--max-shard-size", "20KB"), owned)
    leftover = staged()
    assert len(leftover) == 1 and not out.exists()
    running = Staging(out, "export")  # another export's, still writing: its owner (this process) lives
    export(capsys, trained("sp"), out)
    assert staged() == [running.directory.name]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_killed_import_is_started_over_and_a_run_is_never_taken(trained, workdir_holder, tmp_path, capsys):
    source = tmp_path / "hf"
    transformers_model(source, "llama")
    workdir = tmp_path / "imported"
    args = ["import", str(source), "--workdir", str(workdir), "--config", str(TINY)]
    kill_when(start_cli(*args), lambda: (workdir / "checkpoints").is_dir())
    trained_later = tmp_path / "trained_later"  # the same leftover, then trained past step 0
    shutil.copytree(workdir, trained_later)
    (trained_later / "checkpoints" / "40").mkdir()
    live, pid = workdir_holder(command="import")  # an import still running, in another process
    (live / "checkpoints").mkdir()
    (live / ".jaxtrain-import").touch()
    run_dir = trained("sp")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    live_before = {p: p.read_bytes() for p in live.rglob("*") if p.is_file()}
    for target, word in [(run_dir, "already exists and is not empty"), (live, f"held by `jaxtrain import` (pid {pid},"),
                         (trained_later, "checkpoint step 40")]:
        status, _, err = cli_in_process(capsys, "import", str(source), "--workdir", str(target), "--config", str(TINY))
        assert status == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert {p: p.read_bytes() for p in live.rglob("*") if p.is_file()} == live_before
    status, out, err = cli_in_process(capsys, *args)
    assert status == 0, err
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".jaxtrain")) == []  # claim released
    step0 = json.loads(cli_in_process(capsys, "eval", str(workdir))[1])
    assert step0["step"] == 0 and f"val_loss {step0['val_loss']:.4f}" in out
