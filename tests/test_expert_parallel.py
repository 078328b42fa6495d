"""Expert parallelism (jaxtrain/model/moe_dispatch.py, the `expert` mesh axis): the
all-to-all exchange against the one-device dispatch, worst-case routings included; the
sharded train step against the one-device step; its collective bytes, counted from the
compiled HLO, against the analytic model of tools/communication.py; bitwise resume on an
expert mesh and resharding on resume to an fsdp-only mesh; bad meshes refused in one line.
All on 8 simulated CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import from_dict, load_config
from jaxtrain.model import sharding
from jaxtrain.model.moe_dispatch import dropless_experts, dropless_on_devices
from jaxtrain.tools import communication, hlo_collectives

EXPERT_AXES = (("experts", "embed", "mlp"), ("experts", "embed", "mlp"), ("experts", "mlp", "embed"))
N, D, F, E = 64, 16, 8, 8  # tokens (8 per device), width, expert width, experts (2 per device on expert=4)


def mesh_of(**axes):
    cfg = from_dict({"mesh": {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **axes}})
    return sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(list(axes.values())))])


def distinct_choices(key, k):
    """(N, k) distinct expert ids per token, uniformly random."""
    return jnp.argsort(jax.random.uniform(key, (N, E)), axis=-1)[:, :k].astype(jnp.int32)


ROUTINGS = {  # name -> (N, k) expert ids
    "random top-2": lambda: distinct_choices(jax.random.PRNGKey(0), 2),
    # every token to experts 0 and 1, both on the first shard: each device sends it 2 N/8
    # rows, the dropless worst case C = N_local * min(k, E_local) (nothing may be dropped)
    "all to shard 0": lambda: jnp.tile(jnp.array([[1, 0]], jnp.int32), (N, 1)),
    # top-3 of 8 on 2 experts per device: at most min(k, E_local) = 2 per token on one shard
    "top-3, capacity min(k, E_local)": lambda: jnp.tile(jnp.array([[0, 1, 2]], jnp.int32), (N, 1)),
    "random top-3": lambda: distinct_choices(jax.random.PRNGKey(1), 3),
}


@pytest.mark.parametrize("mesh_axes", [{"expert": 4, "fsdp": 2}, {"expert": 2, "tensor": 2, "fsdp": 2},
                                       {"expert": 8}], ids=["expert4_fsdp2", "expert2_tensor2_fsdp2", "expert8"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_the_exchange_equals_the_one_device_dispatch_with_its_gradients(routing, mesh_axes):
    """Values and gradients (tokens, gates, every expert weight) of the dispatch under
    shard_map with the experts split over `expert` equal the plain one-device sort."""
    experts = ROUTINGS[routing]()
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    tokens = jax.random.normal(keys[0], (N, D))
    gates = jax.nn.softmax(jax.random.normal(keys[1], experts.shape), axis=-1)
    weights = (jax.random.normal(keys[2], (E, D, F)) / 4, jax.random.normal(keys[3], (E, D, F)) / 4,
               jax.random.normal(keys[4], (E, F, D)) / 3)
    cotangent = jax.random.normal(keys[5], (N, D))

    def loss(dispatch):
        return jax.jit(jax.value_and_grad(lambda t, g, w: jnp.sum(dispatch(t, g, w) * cotangent), (0, 1, 2)))

    want = loss(lambda t, g, w: dropless_experts(t, experts, g, *w))(tokens, gates, weights)
    mesh = mesh_of(**mesh_axes)
    sharded = sharding.traced_on(mesh, lambda t, g, w: dropless_on_devices(t, experts, g, w, EXPERT_AXES))
    got = loss(sharded)(*jax.device_put((tokens, gates, weights), sharding.replicated(mesh)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{routing} {path}")
    assert float(jnp.abs(want[0])) > 1  # a real sum, not zeros against zeros


def test_the_exchange_moves_all_to_alls_and_no_tokens_otherwise():
    """The forward dispatch alone on expert=8: an all-to-all of the counts and two of the
    (X, C, d) rows (dispatch, combine), no other collective of tokens."""
    experts = ROUTINGS["random top-2"]()
    mesh = mesh_of(expert=8)
    weights = (jnp.ones((E, D, F)), jnp.ones((E, D, F)), jnp.ones((E, F, D)))
    forward = sharding.traced_on(mesh, lambda t, g, w: dropless_on_devices(t, experts, g, w, EXPERT_AXES))
    arguments = jax.device_put((jnp.ones((N, D)), jnp.ones((N, 2)), weights), sharding.replicated(mesh))
    text = jax.jit(forward).lower(*arguments).compile().as_text()
    capacity = N // 8 * min(2, E // 8)
    moved = sorted((c.kind, c.bytes) for c in hlo_collectives.collectives(text))
    assert moved == [("all-to-all", 4 * E)] + 2 * [("all-to-all", 8 * capacity * D * 4)], moved


@pytest.mark.parametrize("overrides,key", [(["model.moe.n_experts=6", "mesh.expert=4"], "mesh.expert"),
                                           (["model.moe.n_experts=4", "mesh.expert=0"], "mesh.expert")])
def test_a_mesh_the_experts_do_not_split_over_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert err.value.key == key and "\n" not in str(err.value)


def test_a_filled_expert_axis_is_checked_once_resolved():
    cfg = load_config(TINY, ["model.moe.n_experts=6", "mesh.fsdp=1", "mesh.expert=-1"])  # -1: 8 devices
    with pytest.raises(ConfigError) as err:
        sharding.check_batch_splits(cfg, dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, 8)))
                                    )
    assert err.value.key == "mesh.expert" and "n_experts = 6" in str(err.value)
    with pytest.raises(ConfigError) as err:  # the batch splits over data x fsdp x expert
        sharding.check_batch_splits(load_config(TINY, ["model.moe.n_experts=8", "mesh.expert=8", "mesh.fsdp=1",
                                                       "train.batch_size=4"]), {"data": 1, "fsdp": 1, "expert": 8,
                                                                                "tensor": 1})
    assert err.value.key == "train.batch_size" and "data*fsdp*expert = 8" in str(err.value)


# --- the train step on expert meshes ---------------------------------------------------------

def step_config(mesh_axes, optimizer="adamw"):
    """A small MoE model; AdamW with eps 1 (updates linear in the gradients, so that float
    noise in near-zero gradients is not amplified to a full step as with eps 1e-8) and no
    weight decay (the update is the gradients' alone)."""
    return from_dict({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 64,
                                "moe": {"n_experts": 8, "top_k": 2, "expert_d_ff": 16, "n_shared_experts": 1}},
                      "train": {"steps": 4, "batch_size": 8}, "data": {"seq_len": 16},
                      "mesh": {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh_axes},
                      "optimizer": {"name": optimizer, "lr": 0.01, "eps": 1.0, "weight_decay": 0.0}})


def two_steps(mesh_axes, optimizer="adamw"):
    """(the two losses, the parameter updates) of two train steps on a mesh."""
    cfg = step_config(mesh_axes, optimizer)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(list(mesh_axes.values()) or [1]))])
    steps = ts.build_steps(cfg, ts.model_spec(cfg), mesh)
    state = steps.init()
    initial = jax.tree.map(np.asarray, state.params)
    losses = []
    for batch in np.random.default_rng(0).integers(0, 64, (2, 8, 17), dtype=np.int32):
        state, metrics = steps.train(state, jax.device_put(batch, sharding.batch_sharding(mesh)), cfg.optimizer.lr)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(lambda after, before: np.asarray(after) - before, state.params, initial)


# float32 on CPU; the meshes change the order of sums only. Measured worst: loss 2e-7
# relative, updates 2e-4 of each parameter's largest update (the same on fsdp=8 alone).
LOSS_RTOL, UPDATE_TOL = 1e-5, 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_expert_parallel_steps_equal_the_one_device_steps(optimizer):
    ref_losses, ref = two_steps({}, optimizer)
    for mesh_axes in ({"expert": 4, "fsdp": 2}, {"expert": 2, "tensor": 2, "fsdp": 2}):
        losses, got = two_steps(mesh_axes, optimizer)
        np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, err_msg=str(mesh_axes))
        for (path, want), update in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got), strict=True):
            scale = np.abs(want).max()
            assert scale > 0, path  # every parameter moved
            np.testing.assert_allclose(update, want, rtol=0, atol=UPDATE_TOL * scale, err_msg=f"{mesh_axes} {path}")


# --- collective bytes: the compiled HLO against the analytic model ---------------------------

MOE = ["model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.expert_d_ff=128", "data.seq_len=64"]
MESHES = {"expert4_fsdp2": ["mesh.fsdp=2", "mesh.expert=4"],
          "expert2_tensor2_fsdp2": ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]}


def counted(*overrides):
    """(config, analytic bytes by kind, compiled HLO bytes by kind) of tiny.yaml with MOE."""
    cfg = load_config(TINY, [*MOE, *overrides])
    mesh = sharding.make_mesh(cfg.mesh)
    model = communication.by_kind(communication.analytic(cfg, ts.model_spec(cfg), mesh, 4))
    return cfg, model, communication.measured(cfg, jax.devices())["bytes_by_kind"]


@pytest.fixture(scope="module")
def compiled():
    return {(name, extra): counted(*MESHES[name], *extra)
            for name, extra in (("expert4_fsdp2", ()), ("expert4_fsdp2", ("train.batch_size=64",)),
                                ("expert4_fsdp2", ("model.moe.n_experts=16",)),
                                ("expert4_fsdp2", ("model.remat=full", "train.microbatches=2")),
                                ("expert2_tensor2_fsdp2", ()))}


@pytest.mark.slow
@pytest.mark.parametrize("case", [("expert4_fsdp2", ()), ("expert4_fsdp2", ("model.remat=full", "train.microbatches=2")),
                                  ("expert2_tensor2_fsdp2", ())], ids=["expert4_fsdp2", "remat_full_micro2",
                                                                        "expert2_tensor2_fsdp2"])
def test_the_analytic_model_is_within_25_percent_of_the_hlo(compiled, case):
    _, model, kinds = compiled[case]
    assert sum(model.values()) == pytest.approx(sum(kinds.values()), rel=0.25), (model, kinds)
    for kind, count in kinds.items():
        assert model[kind] == pytest.approx(count, rel=0.25, abs=1e5), (kind, model, kinds)
    assert kinds["all-to-all"] == model["all-to-all"] > 0  # the exchange, byte for byte


@pytest.mark.slow
def test_the_exchange_moves_tokens_and_the_weights_do_not_grow_with_the_batch(compiled):
    cfg, _, base = compiled["expert4_fsdp2", ()]
    _, _, big_batch = compiled["expert4_fsdp2", ("train.batch_size=64",)]
    _, _, more_experts = compiled["expert4_fsdp2", ("model.moe.n_experts=16",)]
    weights = lambda kinds: kinds["all-gather"] + kinds["reduce-scatter"]  # noqa: E731
    # 4x the batch: the same parameter traffic, but for one known gather that is not the
    # experts': XLA's SPMD partitioner does not split `topk` along the batch, so every
    # device all-gathers the whole batch's router probabilities (B S x E float32) per layer
    # and picks the top-k of all of them (the same on main with mesh.fsdp=8 or data=8)
    router_probs = cfg.model.n_layers * (64 - cfg.train.batch_size) * cfg.data.seq_len * 8 * 4
    assert weights(big_batch) - weights(base) == router_probs
    counts = cfg.model.n_layers * 4 * 8  # the int32 counts of 8 experts, once per layer
    assert big_batch["all-to-all"] - counts == 4 * (base["all-to-all"] - counts)  # the exchange is the tokens'
    assert more_experts["all-to-all"] == base["all-to-all"] + counts  # 2x the experts: only the counts grow
    assert weights(more_experts) >= 1.5 * weights(base)  # while the expert weights moved do
    assert big_batch["all-reduce"] == base["all-reduce"]  # gradients only: no token is all-reduced


# --- resume --------------------------------------------------------------------------------

EXPERT_RUN = ["model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.expert_d_ff=64", "model.moe.n_shared_experts=1",
              "mesh.expert=4", "mesh.fsdp=-1", "data.seq_len=32", "train.batch_size=8", "train.steps=20",
              "train.eval_every=10", "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory):
    from jaxtrain.run.loop import run

    cfg = load_config(TINY, EXPERT_RUN)
    workdir = tmp_path_factory.mktemp("expert_whole")
    return cfg, workdir, run(cfg, workdir, console=False)


@pytest.mark.slow
def test_an_interrupted_run_on_an_expert_mesh_resumes_bitwise(expert_run, tmp_path):
    from jaxtrain.run.loop import run
    from jaxtrain.run.metrics import read_metrics
    from test_train import final_state, without_timing

    cfg, whole, _ = expert_run
    assert run(cfg, tmp_path, stop_after=10, console=False).step == 10
    assert run(cfg, tmp_path, console=False).resumed_from == 10
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == \
        without_timing(read_metrics(whole / "metrics.jsonl"))
    (ref, ref_data, _), (got, data, _) = final_state(cfg, whole), final_state(cfg, tmp_path)
    assert data == ref_data
    w_up = got.params["blocks"]["mlp"]["w_up"]
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)  # experts split
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_checkpoint_of_an_expert_mesh_resumes_on_an_fsdp_only_mesh(expert_run, tmp_path):
    """Saved with the experts split over expert=4 x fsdp=2, restored into fsdp=8 (the
    experts whole on every device): the run goes on from step 10 as on the expert mesh."""
    import shutil

    from jaxtrain.run.loop import run
    from jaxtrain.run.metrics import read_metrics
    from test_train import final_state

    cfg, whole, _ = expert_run
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "20")
    fsdp_only = load_config(TINY, [*EXPERT_RUN, "mesh.expert=1"])
    assert run(fsdp_only, workdir, console=False).resumed_from == 10
    got = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}
    want = {r["step"]: r for r in read_metrics(whole / "metrics.jsonl")}
    assert sorted(got) == sorted(want) and max(got) == 20
    for step in want:  # other partitioning after step 10: other sum order
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), step
    state, _, _ = final_state(fsdp_only, workdir)
    assert state.params["blocks"]["mlp"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
    for a, b in zip(jax.tree.leaves(final_state(cfg, whole)[0].params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)
