"""Muon under the parametrization table: Newton-Schulz, the chain against a reference
written here in numpy, the table's Muon rows, exact resume and sharded steps."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import from_dict, load_config
from jaxtrain.model import parametrization, sharding
from jaxtrain.optim import muon
from jaxtrain.optim.optimizer import make_optimizer

from conftest import TINY, cli_in_process


def config(width=64, depth=2, scale="spectral", name="mup", mesh=(1, 1, 1), **optimizer):
    return from_dict({
        "model": {"d_model": width, "n_layers": depth, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
        "parametrization": {"name": name, "d0": 32, "L0": 1, "depth_alpha": 1.0},
        "optimizer": {"name": "muon", "muon_scale": scale, "lr": 0.05, "adam_lr": 0.01, "weight_decay": 0.1,
                      "clip_norm": 0.0, **optimizer},
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)),
        "schedule": {"name": "constant"},
        "train": {"steps": 10, "batch_size": 16},
    })


# --- Newton-Schulz -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 48, 80), (2, 80, 48)])
@pytest.mark.parametrize("dtype,slack", [(jnp.float32, 1e-3), (jnp.bfloat16, 0.06)])
def test_newton_schulz_puts_singular_values_in_the_documented_band(shape, dtype, slack):
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    x[..., 0, :] *= 50.0  # one dominant direction: a spread of singular values, as in momenta
    out = np.asarray(muon.newton_schulz(jnp.asarray(x), 5, dtype), np.float64)
    low, high = muon.NS_BAND
    for before, after in zip(x.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:]), strict=True):
        s0 = np.linalg.svd(before / np.linalg.norm(before), compute_uv=False)
        s = np.linalg.svd(after, compute_uv=False)
        assert s.max() <= high + slack
        assert (s[s0 >= muon.NS_BAND_FROM] >= low - slack).all(), (s0.min(), s.min())
        # the singular vectors are kept: U^T NS(X) V is diagonal for X = U S V^T
        u, _, vt = np.linalg.svd(before, full_matrices=False)
        core = u.T @ after @ vt.T
        assert np.linalg.norm(core - np.diag(np.diag(core))) < 10 * slack * np.linalg.norm(core) + 1e-3


def test_newton_schulz_keeps_zero_at_zero():
    assert not np.asarray(muon.newton_schulz(jnp.zeros((8, 16)))).any()


# --- the chain against a reference ----------------------------------------------------

def reference_ns(n, steps=5):
    """The quintic iteration in float64 numpy, on the wide orientation."""
    a, b, c = muon.QUINTIC
    tall = n.shape[0] > n.shape[1]
    x = n.T if tall else n
    x = x / (np.linalg.norm(x) + muon.NS_EPS)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def reference_updates(cfg, table, params, grads_seq):
    """Two steps of the documented update, per parameter, in float64 numpy."""
    opt, lr = cfg.optimizer, cfg.optimizer.lr
    out = {}
    for path, rule in table.rules.items():
        theta = np.asarray(_leaf(params, path), np.float64)
        m = v = trace = 0.0
        for t, grads in enumerate(grads_seq, start=1):
            g = np.asarray(_leaf(grads, path), np.float64)
            if rule.update == "muon":
                trace = opt.muon_momentum * trace + g
                nesterov = g + opt.muon_momentum * trace
                stack = nesterov.reshape(rule.layers or 1, math.prod(rule.shape[:rule.fan_in_dims]), -1)
                direction = np.stack([reference_ns(s) for s in stack]).reshape(g.shape) * rule.muon_scale
                rate = rule.lr
            else:
                m = opt.b1 * m + (1 - opt.b1) * g
                v = opt.b2 * v + (1 - opt.b2) * g * g
                m_hat, v_hat = m / (1 - opt.b1**t), v / (1 - opt.b2**t)
                direction = m_hat / (np.sqrt(v_hat) + opt.eps * rule.eps)
                rate = rule.lr * opt.adam_lr / lr
            theta = theta - lr * rate * (direction + opt.weight_decay * rule.weight_decay * theta)
        out[path] = theta
    return out


def _leaf(tree, path):
    for key in path.split("."):
        tree = tree[key]
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["spectral", "rms_match", "none"])
def test_two_muon_steps_of_the_chain_equal_the_reference_for_every_role(scale):
    cfg = config(width=64, depth=2, scale=scale)
    spec = ts.model_spec(cfg)
    tx = make_optimizer(cfg.optimizer, spec.table)
    params = ts.init_params(cfg, spec, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) * 1e-2, params)
                 for _ in range(2)]
    state, got = tx.init(params), params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, got, learning_rate=cfg.optimizer.lr)
        got = jax.tree.map(lambda p, u: p + u, got, updates)
    want = reference_updates(cfg, spec.table, params, grads_seq)
    roles = set()
    for path, rule in spec.table.rules.items():
        roles.add((rule.role, rule.update))
        np.testing.assert_allclose(np.asarray(_leaf(got, path)), want[path], rtol=2e-4, atol=2e-6, err_msg=path)
    assert roles == {("hidden", "muon"), ("embedding", "adam"), ("readout", "adam"), ("vector", "adam")}


# --- the table's Muon rows ------------------------------------------------------------

def test_table_gives_muon_scales_and_rates_per_parameter():
    rules = ts.model_spec(config(width=128, depth=4)).table.rules
    d, ff = 128, config(width=128).model.ff_dim
    head = d // 4
    expected = {"blocks.attn.wq": (d, d), "blocks.attn.wk": (d, 2 * head), "blocks.mlp.w_up": (d, ff),
                "blocks.mlp.w_down": (ff, d)}
    for path, (fan_in, fan_out) in expected.items():
        rule = rules[path]
        assert rule.update == "muon" and rule.muon_scale == pytest.approx(math.sqrt(fan_out / fan_in))
        assert rule.lr == 1.0 and rule.weight_decay == 1.0  # CompleteP: r^(a-1) = 1; no width factor
    for path in ("embed", "lm_head", "final_norm.scale"):
        assert rules[path].update == "adam" and rules[path].muon_scale == 0.0
    assert rules["lm_head"].lr == 1.0 and rules["lm_head"].eps == pytest.approx(32 / 128)  # AdamW's muP row

    rms = ts.model_spec(config(width=128, depth=4, scale="rms_match")).table.rules["blocks.mlp.w_up"]
    adam = ts.model_spec(from_dict({**config(width=128, depth=4).to_dict(), "optimizer": {}})).table.rules
    assert rms.muon_scale == pytest.approx(0.2 * math.sqrt(ff))
    assert (rms.lr, rms.weight_decay) == (adam["blocks.mlp.w_up"].lr, adam["blocks.mlp.w_up"].weight_decay)
    depth_mup = ts.model_spec(from_dict({**config(width=64, depth=4).to_dict(),
                                         "parametrization": {"name": "mup", "d0": 32, "L0": 1, "depth_alpha": 0.5}}))
    assert depth_mup.table.rules["blocks.attn.wo"].lr == pytest.approx(4 ** -0.5)


def test_adam_lr_without_muon_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.*adam_lr"):
        from_dict({"optimizer": {"adam_lr": 0.01}})


def test_table_saved_before_the_muon_fields_still_matches_an_adamw_run():
    table = ts.model_spec(load_config(TINY)).table
    saved = table.to_json()
    for rule in saved["rules"].values():
        del rule["update"], rule["muon_scale"]
    assert parametrization.describe_difference(saved, table.to_json()) is None
    muon_table = ts.model_spec(load_config(TINY, ["optimizer.name=muon"])).table.to_json()
    assert "update: checkpoint has 'adam', this run has 'muon'" in parametrization.describe_difference(saved, muon_table)


# --- on meshes ------------------------------------------------------------------------

def two_steps(mesh_shape, dtype="float32"):
    """(last loss, initial params on the host, final state) of two Muon steps on a mesh."""
    cfg = config(width=64, depth=2, mesh=mesh_shape, muon_ns_dtype=dtype)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    state = steps.init()
    init = jax.tree.map(np.asarray, state.params)
    for batch in np.random.default_rng(0).integers(0, 256, (2, 16, 33), dtype=np.int32):
        state, metrics = steps.train(state, jax.device_put(batch, sharding.batch_sharding(mesh)), cfg.optimizer.lr)
    return float(metrics["loss"]), init, state


@pytest.fixture(scope="module")
def one_device():
    return two_steps((1, 1, 1))


# Float32: the meshes change only the order of reductions; Newton-Schulz's five matmul
# rounds amplify that a little, hence a looser bound than AdamW's in test_sharding.py.
@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_sharded_muon_step_equals_the_one_device_step(mesh_shape, one_device):
    ref_loss, _, ref = one_device
    loss, _, state = two_steps(mesh_shape)
    assert loss == pytest.approx(ref_loss, rel=2e-4)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)
    w_up = state.params["blocks"]["mlp"]["w_up"]  # stacked (layers, embed, mlp), and its momentum with it
    momenta = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == w_up.shape]
    assert w_up.sharding.spec != P() and momenta
    assert all(m.sharding.spec == w_up.sharding.spec for m in momenta)


@pytest.mark.slow
def test_bfloat16_iterations_stay_close_to_float32(one_device):
    _, init, ref = one_device
    _, _, state = two_steps((1, 1, 1), dtype="bfloat16")
    for path in ("attn.wq", "mlp.w_down"):
        layer, name = path.split(".")
        start, want = init["blocks"][layer][name], np.asarray(ref.params["blocks"][layer][name])
        got = np.asarray(state.params["blocks"][layer][name])
        assert np.linalg.norm(got - want) < 0.05 * np.linalg.norm(want - start), path


# --- resume, telemetry, dry-run ----------------------------------------------------------

@pytest.mark.slow
def test_interrupted_muon_run_resumes_bitwise_and_reports_update_rms(tmp_path):
    from jaxtrain.run.metrics import read_metrics
    from jaxtrain.run.loop import run
    from test_train import final_state, without_timing

    cfg = load_config(TINY, ["optimizer.name=muon", "optimizer.lr=0.03", "train.steps=20", "train.eval_every=10",
                             "diagnostics.telemetry_every=5"])
    run(cfg, tmp_path / "whole")
    assert run(cfg, tmp_path / "resumed", stop_after=10).step == 10
    assert run(cfg, tmp_path / "resumed").resumed_from == 10
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert without_timing(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == without_timing(rows)
    (ref, ref_data, _), (got, data, _) = final_state(cfg, tmp_path / "whole"), final_state(cfg, tmp_path / "resumed")
    assert data == ref_data
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    watched = [r for r in rows if "update_rms/hidden" in r]
    assert [r["step"] for r in watched] == [5, 10, 15, 20]
    assert all(0 < r["update_rms/hidden"] < r["lr"] for r in watched)  # lr * muon_scale * RMS(O), RMS(O) << 1


def test_dry_run_counts_one_momentum_for_muon_and_two_moments_for_adam():
    from jaxtrain.run import memory
    from jaxtrain.tools import dry_run

    for name in ("adamw", "muon"):
        cfg = load_config(TINY, [f"optimizer.name={name}", "mesh.fsdp=1"])
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        spec = ts.model_spec(cfg)
        steps = ts.build_steps(cfg, spec, mesh)
        abstract = steps.abstract_state()
        held = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract.opt_state) if leaf.ndim)
        plan = dry_run.plan(cfg, devices=1, backend="cpu")
        assert plan["memory_per_device"]["optimizer"] == held == memory.optimizer_state_per_device(spec, mesh)
        hidden = plan["roles"]["hidden"]
        assert hidden["update"] == (["muon"] if name == "muon" else ["adam"])
        assert sum(r["params"] for r in plan["roles"].values()) * 8 > held or name == "adamw"


@pytest.mark.slow
def test_bench_times_muon_against_its_adamw_twin_in_one_run(capsys):
    status, out, err = cli_in_process(capsys, "bench", str(TINY), "--steps", "1", "--warmup", "0",
                                      "--set", "optimizer.name=muon", "--set", "optimizer.adam_lr=0.001")
    assert status == 0, err
    report = json.loads(out)
    assert report["optimizer"] == "muon"
    assert report["step_time_ratio_vs_adamw"] == pytest.approx(report["muon_step_time_s"] / report["adamw_step_time_s"])


@pytest.mark.slow
@pytest.mark.parametrize("layers,mesh", [(8, ["mesh.fsdp=8"]), (2, ["mesh.fsdp=8"]), (4, ["mesh.fsdp=2", "mesh.tensor=4"])])
def test_muon_moves_the_momentum_once_and_adds_no_all_reduce(layers, mesh):
    """From the compiled HLO: Muon adds to AdamW's collectives at most two moves of the
    hidden momenta' bytes (into the layout Newton-Schulz runs in, by all-to-all or, when
    no mesh axis divides the layers, one all-gather; and the update back to the shards),
    whatever the number of iterations, and no all-reduce (no iteration runs on split
    matrices). Measured: 0.4x (fsdp 8, 8 layers), 1.0x (2 layers), 1.1x (fsdp 2 x tensor 4)."""
    from jaxtrain.tools import communication

    kinds = {}
    for name in ("adamw", "muon"):
        cfg = load_config(TINY, [*mesh, f"model.n_layers={layers}", f"optimizer.name={name}"])
        kinds[name] = communication.measured(cfg, jax.devices())["bytes_by_kind"]
    table = ts.model_spec(cfg).table
    hidden = sum(4 * math.prod(r.shape) * r.layers for r in table.rules.values() if r.update == "muon")
    added = {kind: kinds["muon"][kind] - kinds["adamw"][kind] for kind in kinds["adamw"]}
    assert added["all-reduce"] == 0 and added["reduce-scatter"] == 0, kinds
    assert 0 <= added["all-gather"] + added["all-to-all"] + added["collective-permute"] <= 2 * hidden, (added, hidden)
