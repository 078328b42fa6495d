"""Scale-out properties read off the compiled train step (8 simulated CPU devices), where a
numerical equivalence test cannot see them: FSDP moves weights, never activations; data
parallel all-reduces the gradients once; tensor parallel adds only Megatron's activation
all-reduces; compiled size does not grow with depth; stacked storage is what is saved.

Bytes are counted from the compiled HLO (`jaxtrain/hlo_collectives.py`: output bytes of
every collective, times the trip count of the loops it sits in). ZeRO-3's ideal per step
is 3 x parameter bytes (gather forward, gather backward, reduce the gradients), data
parallel's 1 x; the bounds below are those of docs/performance.md ("Scaling").
"""

import json
import math

import jax
import pytest

from conftest import REPO, TINY, cli_in_process, run_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import parametrization, sharding
from jaxtrain.tools import communication, hlo_collectives, targets

SMALL = REPO / "configs" / "small.yaml"
MESHES = {"fsdp8": ["mesh.fsdp=8"], "data8": ["mesh.data=8", "mesh.fsdp=1"],
          "fsdp2_tensor4": ["mesh.fsdp=2", "mesh.tensor=4"]}


def param_bytes(cfg) -> int:
    return sum(leaf.size * 4 for leaf in jax.tree.leaves(ts.model_spec(cfg).abstract_params))  # float32 on CPU


@pytest.fixture(scope="module")
def compiled():
    """{(mesh, batch): (config, collective bytes by kind, temporary bytes)} of small.yaml."""
    out = {}
    for name, batch in (("fsdp8", 32), ("fsdp8", 256), ("data8", 32), ("data8", 256), ("fsdp2_tensor4", 32)):
        cfg = load_config(SMALL, [*MESHES[name], f"train.batch_size={batch}"])
        measured = communication.measured(cfg, jax.devices())
        out[name, batch] = cfg, measured["bytes_by_kind"], measured["temp_bytes"]
    return out


@pytest.mark.slow
def test_fsdp_moves_weights_not_activations(compiled):
    cfg, kinds, _ = compiled["fsdp8", 32]
    total = sum(kinds.values())
    assert total <= 1.5 * 3 * param_bytes(cfg), kinds
    assert kinds["all-gather"] >= param_bytes(cfg)  # the weights really are gathered
    assert sum(compiled["fsdp8", 256][1].values()) <= 1.1 * total  # 8x the batch, the same bytes


@pytest.mark.slow
def test_data_parallel_all_reduces_the_gradients_once(compiled):
    cfg, kinds, _ = compiled["data8", 32]
    assert param_bytes(cfg) <= sum(kinds.values()) <= 1.5 * param_bytes(cfg), kinds
    assert kinds["all-gather"] == 0


@pytest.mark.slow
def test_tensor_parallel_adds_only_megatron_all_reduces(compiled):
    cfg, kinds, _ = compiled["fsdp2_tensor4", 32]
    mesh = sharding.make_mesh(cfg.mesh)
    model = communication.analytic(cfg, ts.model_spec(cfg), mesh, 4)
    local_activation = cfg.train.batch_size // 2 * cfg.data.seq_len * cfg.model.d_model * 4
    assert model["tensor all-reduce"]["bytes"] == (4 * cfg.model.n_layers + 1) * local_activation
    assert sum(kinds.values()) <= 1.5 * sum(communication.by_kind(model).values()), kinds


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_the_analytic_model_is_within_25_percent_of_the_hlo(compiled, name):
    cfg, kinds, _ = compiled[name, 32]
    model = communication.by_kind(communication.analytic(cfg, ts.model_spec(cfg), sharding.make_mesh(cfg.mesh), 4))
    assert sum(model.values()) == pytest.approx(sum(kinds.values()), rel=0.25), (model, kinds)
    for kind, count in kinds.items():
        assert model[kind] == pytest.approx(count, rel=0.25, abs=1e5), kind


@pytest.mark.slow
@pytest.mark.parametrize("batch", [32, 256])
def test_fsdp_temporary_memory_is_that_of_data_parallel(compiled, batch):
    assert compiled["fsdp8", batch][2] <= 1.3 * compiled["data8", batch][2]


@pytest.mark.slow
def test_the_compiled_step_does_not_grow_with_depth():
    """scan over stored-stacked blocks: one block is compiled whatever the depth (the
    compile-time counterpart, in seconds, is `jaxtrain bench`'s compile_s)."""
    def instructions(layers: int) -> int:
        cfg = load_config(TINY, [f"model.n_layers={layers}", "mesh.fsdp=8"])
        return communication.compiled_step(cfg, sharding.make_mesh(cfg.mesh)).as_text().count(" = ")

    shallow, deep = instructions(2), instructions(8)
    assert deep <= 1.05 * shallow, (shallow, deep)


def test_bench_writes_the_hlo_it_counts(capsys, tmp_path):
    out = tmp_path / "step.hlo"
    status, stdout, err = cli_in_process(capsys, "bench", str(TINY), "--steps", "1", "--warmup", "0",
                                         "--hlo-out", str(out), "--set", "mesh.fsdp=8")
    assert status == 0, err
    report = json.loads(stdout)
    assert report["collective_bytes_per_device"] == hlo_collectives.bytes_by_kind(out.read_text())
    assert report["collective_bytes_per_device"]["all-gather"] > 0
    status, _, err = cli_in_process(capsys, "bench", str(TINY), "--hlo-out", str(tmp_path / "no" / "x.hlo"))
    assert status == 2 and "--hlo-out" in err and err.count("\n") == 1


def test_dry_run_compares_the_model_with_the_compiled_step_and_gives_a_roofline(capsys):
    status, out, err = cli_in_process(capsys, "dry-run", str(SMALL), "--devices", "8", "--compile",
                                      "--set", "mesh.fsdp=2", "--set", "mesh.tensor=4")
    assert status == 0, err
    ratio = float(out.split("compiled / analytic ")[1].split()[0])
    assert 0.75 <= ratio <= 1.25, out
    assert "tensor all-reduce" in out
    status, out, err = cli_in_process(capsys, "dry-run", str(SMALL), "--target", "h100x8",
                                      "--set", "mesh.fsdp=2", "--set", "mesh.tensor=4")
    assert status == 0, err
    assert "# roofline on 8 x H100 SXM" in out and "# mesh over 8 devices" in out
    status, _, err = cli_in_process(capsys, "dry-run", str(SMALL), "--target", "abacus")
    assert status == 2 and "--target abacus" in err
    status, _, err = cli_in_process(capsys, "dry-run", str(SMALL), "--target", "h100x8", "--devices", "4")
    assert status == 2 and "--devices 4: --target h100x8 has 8 devices" in err


def test_roofline_is_the_slower_of_compute_and_communication():
    cfg = load_config(REPO / "configs" / "gpt350m.yaml")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    model = communication.analytic(cfg, ts.model_spec(cfg), mesh, 2)
    roof = communication.roofline(cfg, model, 8, targets.target("h100x8").hardware)
    flops_per_device = roof["compute_s"] * 989e12
    assert flops_per_device == pytest.approx(cfg.train.batch_size * cfg.data.seq_len / 8 * 6 * 3.5e8, rel=0.3)
    traffic = sum(entry["traffic"] for entry in model.values())
    assert roof["communication_s"] == pytest.approx(traffic / 450e9)
    assert roof["step_s"] == max(roof["compute_s"], roof["communication_s"])
    across_nodes = communication.roofline(cfg, model, 64, targets.target("h100x8").hardware)
    assert across_nodes["link_bytes_per_s"] == 50e9


@pytest.mark.slow
def test_a_checkpoint_of_the_per_layer_layout_is_refused_in_one_line(tmp_path, capsys):
    """Written before the blocks were stacked: its table names blocks.0.*, blocks.1.*, ..."""
    short = ("--set", "train.steps=2", "--set", "schedule.warmup_steps=1", "--set", "checkpoint.every_steps=2")
    done = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path), *short)
    assert done.returncode == 0, done.stderr
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    rules = meta["parametrization"]["rules"]
    for path in [p for p in rules if p.startswith("blocks.")]:
        rule = rules.pop(path)
        for layer in range(rule["layers"]):
            rules[path.replace("blocks.", f"blocks.{layer}.", 1)] = {**rule, "layers": 0}
    meta_file.write_text(json.dumps(meta))
    run_files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".owner"}
    before = run_files()  # the lock file records its newest owner: not a file of the run
    again = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path), *short)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "one set of weights per layer" in again.stderr
    assert run_files() == before


def test_stacked_rules_are_those_of_one_layer():
    cfg = load_config(TINY, ["model.n_layers=3"])
    table = ts.model_spec(cfg).table
    wq = table.rules["blocks.attn.wq"]
    assert wq.layers == 3 and wq.shape == (64, 4, 16) and wq.role == "hidden"
    assert wq.init_std == pytest.approx(1 / math.sqrt(64))
    assert wq.per_layer_paths("blocks.attn.wq") == [f"blocks.{i}.attn.wq" for i in range(3)]
    assert table.rules["blocks.attn_norm.scale"].role == "vector"
    assert table.rules["embed"].layers == 0
    assert parametrization.describe_difference(table.to_json(), table.to_json()) is None
