"""Config files load; overrides apply; bad input is one line naming the key, exit 2."""

import pydantic
import pytest

from conftest import REPO, TINY, run_cli
from jaxtrain import cli
from jaxtrain.config.errors import UserError
from jaxtrain.config.files import from_dict, load_config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["model.d_model=128", "model.qk_norm=true", "optimizer.lr=1e-3",
                             "data.paths=['{stdlib}/json/*.py']"])
    assert cfg.model.d_model == 128 and cfg.model.qk_norm is True
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.data.paths == ("{stdlib}/json/*.py",)


def test_config_is_frozen(tiny_cfg):
    with pytest.raises(pydantic.ValidationError):
        tiny_cfg.model.d_model = 1


BAD_CASES = {
    "unknown key": (["model.n_layer=3"], "model.n_layer", "unknown key"),
    "unknown section": (["modle.d_model=3"], "modle", "unknown key"),
    "wrong type": (["model.d_model=wide"], "model.d_model", "integer"),
    "wrong type bool": (["model.qk_norm=maybe"], "model.qk_norm", "boolean"),
    "heads do not divide width": (["model.n_heads=3"], "model.n_heads", "must divide d_model"),
    "kv heads do not divide heads": (["model.n_kv_heads=3"], "model.n_kv_heads", "must divide n_heads"),
    "negative value": (["train.steps=-5"], "train.steps", "greater than 0"),
    "warmup longer than run": (["schedule.warmup_steps=500"], "schedule.warmup_steps", "shorter than the run"),
    "warmup given twice": (["schedule.warmup_tokens=64"], "schedule", "give the warmup length once"),
    "mesh does not match devices": (["mesh.data=3", "mesh.fsdp=1"], "mesh", "does not match the 8"),
    "mesh cannot fill": (["mesh.data=3"], "mesh.fsdp", "cannot fill"),
    "batch not divisible by mesh": (["train.batch_size=12"], "train.batch_size", "not divisible"),
    "vocabulary too small": (["model.vocab_size=100"], "model.vocab_size", "vocabulary of the corpus (256 ids)"),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_config_is_one_line_naming_the_key(case, tmp_path, capsys):
    overrides, key, fragment = BAD_CASES[case]
    argv = ["train", str(TINY), "--workdir", str(tmp_path / "run")]
    for item in overrides:
        argv += ["--set", item]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"'{key}'" in err and fragment in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_and_malformed_files_name_the_file(tmp_path):
    """As a file, not as a config key."""
    with pytest.raises(UserError, match="^config file .*nope.yaml: cannot be read"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: [64\n")
    with pytest.raises(UserError, match=r"^config file .*broken.yaml: invalid YAML at line"):
        load_config(broken)


def test_console_exit_status_and_no_traceback(tmp_path):
    proc = run_cli("train", str(TINY), "--workdir", str(tmp_path), "--set", "model.n_heads=3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxtrain: error: config key 'model.n_heads': n_heads=3 must divide d_model=64"]


def test_identity_keys_are_marked_once_and_a_new_key_is_identity_by_default():
    """What may change on resume comes from config.IDENTITY_SECTIONS and each section's
    RESUMABLE; a data key nobody listed (one added later) is refused, not resumed."""
    from jaxtrain.config.resume import identity_difference

    saved = from_dict({}).to_dict()
    changed = {**saved, "data": {**saved["data"], "val_batches": 3, "read_threads": 0}}
    assert identity_difference(changed, saved) is None  # listed as resumable
    changed["model"] = {**saved["model"], "remat": "full", "dtype": "bfloat16"}
    changed["optimizer"] = {**saved["optimizer"], "lr": 1e-4, "muon_momentum": 0.9}
    assert identity_difference(changed, saved) is None
    changed["data"] = {**changed["data"], "seq_len": 128}
    assert identity_difference(changed, saved) == ("data.seq_len", 256, 128)
    muon = {**saved, "optimizer": {**saved["optimizer"], "name": "muon"}}  # another optimizer state
    assert identity_difference(muon, saved) == ("optimizer.name", "adamw", "muon")
    future = {**saved, "data": {**saved["data"], "new_field": 1}}
    assert identity_difference(future, {**saved, "data": {**saved["data"], "new_field": 2}}) == \
        ("data.new_field", 2, 1)
    # a config saved before a key existed had the key's default: the default resumes, no other value
    before_packing = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "packing"}}
    assert identity_difference(saved, before_packing) is None
    packed = {**saved, "data": {**saved["data"], "packing": True}}
    assert identity_difference(packed, before_packing) == ("data.packing", False, True)
    # the same inside a nested section (model.moe), named by its full dotted key
    moe = {k: v for k, v in saved["model"]["moe"].items() if k != "router_z_loss"}
    before_z_loss = {**saved, "model": {**saved["model"], "moe": moe}}
    assert identity_difference(saved, before_z_loss) is None
    fewer = {**saved, "model": {**saved["model"], "moe": {**saved["model"]["moe"], "router_z_loss": 0.0}}}
    assert identity_difference(fewer, before_z_loss) == ("model.moe.router_z_loss", 0.001, 0.0)
    assert identity_difference({**saved, "train": {**saved["train"], "steps": 9}}, saved) is None
    qk = {**saved, "model": {**saved["model"], "qk_norm": True}}
    assert identity_difference(qk, saved, sections=("parametrization",)) is None
    assert identity_difference(qk, saved, sections=("model",))[0] == "model.qk_norm"
