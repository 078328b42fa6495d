"""How the step is computed must not change what it computes: remat, scan over layers and
gradient accumulation give the plain step's losses and weights; bf16 stays close to fp32.
Also `jaxtrain bench` on the tiny config (fields present, MFU in (0, 1])."""

import json
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TINY, cli_in_process, run_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding
from jaxtrain.optim.optimizer import make_optimizer
from jaxtrain.optim.schedules import lr_per_step

STEPS, BATCH, SEQ = 4, 32, 64


def text_batches() -> list[np.ndarray]:
    """Real bytes of a standard-library source file, as (BATCH, SEQ+1) token batches."""
    data = np.frombuffer(Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_bytes(), np.uint8)
    windows = data[: STEPS * BATCH * (SEQ + 1)].astype(np.int32)
    return list(windows.reshape(STEPS, BATCH, SEQ + 1))


def train_losses(*overrides: str) -> tuple[np.ndarray, dict]:
    """Losses of STEPS real train steps (8 devices) and the final params."""
    cfg = load_config(TINY, [f"train.batch_size={BATCH}", *overrides])
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_divides(cfg, mesh)
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    state, step = steps.init(), steps.train
    losses, lrs = [], lr_per_step(cfg)
    for i, batch in enumerate(text_batches()):
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)), np.float32(lrs[i]))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def plain():
    return train_losses("model.dtype=float32")


def assert_params_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("overrides", [
    ("model.remat=dots_saveable",),
    ("model.remat=full",),
    ("model.scan_layers=true",),
    ("model.scan_layers=true", "model.remat=full"),
    ("train.microbatches=2",),
    ("train.microbatches=4", "model.remat=full"),
], ids=lambda o: "+".join(o))
@pytest.mark.slow
def test_execution_options_do_not_change_the_result(plain, overrides):
    losses, params = train_losses("model.dtype=float32", *overrides)
    plain_losses, plain_params = plain
    assert plain_losses[-1] < plain_losses[0] - 0.3  # the steps did learn something
    # float32 reassociation only: a few ulps in the loss, 1e-5 in weights after 4 Adam steps
    np.testing.assert_allclose(losses, plain_losses, rtol=2e-6)
    assert_params_close(params, plain_params, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_loss_tracks_float32(plain):
    """bf16 matmuls (params, optimizer and loss in fp32) stay within 0.02 nats of fp32 over
    the first steps, where the loss itself falls by more than 0.3."""
    losses, _ = train_losses("model.dtype=bfloat16")
    plain_losses, _ = plain
    np.testing.assert_allclose(losses, plain_losses, atol=0.02)
    assert not np.allclose(losses, plain_losses, atol=1e-6, rtol=0)  # bf16 really ran


def test_microbatches_must_split_over_the_devices():
    from jaxtrain.config.errors import ConfigError

    with pytest.raises(ConfigError, match="train.microbatches"):
        train_losses("train.microbatches=8")  # 32 sequences / 8 slices = 4, not a multiple of 8 devices


@pytest.mark.slow
def test_bench_reports_throughput_mfu_and_memory(capsys):
    result = run_in_process(capsys, "bench", str(TINY), "--steps", "2", "--warmup", "1", "--set", "mesh.fsdp=4", "--set", "mesh.tensor=2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "step_time_s", "model_flops_per_token", "compile_s", "peak_memory_bytes"):
        assert report[key] > 0, key
    assert 0 < report["mfu"] <= 1
    assert report["mesh"]["tensor"] == 2 and report["config"]["compute_dtype"] == "float32"
    assert report["tokens_per_s"] == pytest.approx(16 * 64 / report["step_time_s"])


def test_bench_bad_input_is_one_line(capsys):
    status, _, err = cli_in_process(capsys, "bench", str(TINY), "--steps", "0")
    assert status == 2 and err.count("\n") == 1 and "--steps 0" in err
    status, _, err = cli_in_process(capsys, "bench", str(TINY), "--set", "model.attention=cudnn")
    assert status == 2 and "model.attention" in err, err


@pytest.mark.parametrize("overrides, primitive", [
    (("model.remat=full",), "nothing_saveable"), (("model.scan_layers=false",), "unroll=2"),  # tiny: 2 layers
    (("train.microbatches=2",), "scan[")])
def test_the_options_are_in_the_traced_step(overrides, primitive):
    """Guards the equality test above against options that are silently ignored."""
    def jaxpr_text(*extra):
        cfg = load_config(TINY, [f"train.batch_size={BATCH}", *extra])
        spec = ts.model_spec(cfg)
        tx = make_optimizer(cfg.optimizer, spec.table)
        state = jax.eval_shape(lambda: ts.init_state(cfg, spec, tx, None))
        step = lambda s, b: ts.train_step(s, b, cfg.optimizer.lr, spec=spec, tx=tx, z_loss=0.0,
                                          dropout=False, microbatches=cfg.train.microbatches)
        return str(jax.make_jaxpr(step)(state, text_batches()[0]))

    assert jaxpr_text(*overrides).count(primitive) > jaxpr_text().count(primitive)


def test_the_abstract_arguments_are_what_the_loop_feeds():
    """bench, dry-run --compile and the communication tests lower the step from these: under
    packing the batch is the pipeline's dict, every leaf on the loop's shardings."""
    cfg = load_config(TINY, ["data.packing=true"])
    mesh = sharding.make_mesh(cfg.mesh)
    steps = ts.build_steps(cfg, ts.model_spec(cfg), mesh)
    state, batch, lr = steps.abstract_arguments()
    assert jax.tree.map(lambda a: a.sharding, state) == steps.shardings
    assert sorted(batch) == ["segment_ids", "tokens"]
    for leaf in batch.values():
        assert leaf.shape == (cfg.train.batch_size, cfg.data.seq_len + 1) and leaf.dtype == np.int32
        assert leaf.sharding == sharding.batch_sharding(mesh)
    assert lr.shape == () and lr.dtype == np.float32
