"""The Scorer (jaxtrain/run/scoring.py): lm-evaluation-harness's loglikelihood and
loglikelihood_rolling on the training model, against a direct float32 computation and
against lm_eval's own windowing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.schema import MeshConfig
from jaxtrain.model import sharding
from jaxtrain.run.scoring import Scorer, disjoint, rolling_windows

SEQ_LEN = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxtrain.config.files import load_config
    from tests.conftest import TINY

    cfg = load_config(TINY, [f"data.seq_len={SEQ_LEN}"])
    spec = ts.model_spec(cfg)
    params = jax.device_get(ts.init_params(cfg, spec, jax.random.PRNGKey(3)))
    return spec, params


def _on(spec, params, mesh_cfg):
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor])
    return mesh, jax.device_put(params, sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh))


def _direct(spec, params, context, continuation):
    """HFLM's computation, one request alone on one device, float32 log-softmax."""
    whole = (list(context) + list(continuation))[-(SEQ_LEN + 1):]
    logits = ts.bind_model(spec, params)(jnp.asarray([whole[:-1]], jnp.int32))[0].astype(jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[-len(continuation):]
    cont = np.asarray(continuation)
    greedy = bool(np.all(np.asarray(jnp.argmax(logits, -1))[-len(continuation):] == cont))
    return float(np.sum(logp[np.arange(len(cont)), cont])), greedy


def _requests(rng):
    """Contexts of 1 to 30 tokens (some longer than the window), continuations of 1 to 6."""
    return [(rng.integers(1, 256, rng.integers(1, 30)).tolist(), rng.integers(1, 256, rng.integers(1, 7)).tolist())
            for _ in range(23)]


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (0, 1, 5, 15, 16, 17, 31, 32, 33, 100):
        tokens = list(range(1, n + 1))
        for max_seq_len in (1, 4, 16):
            ours = [disjoint(w) for w in rolling_windows(tokens, 0, max_seq_len)]
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, max_seq_len, 1)]
            assert ours == theirs, (n, max_seq_len)


def test_continuations_and_rolling_equal_direct_computation(model):
    spec, params = model
    rng = np.random.default_rng(0)
    requests = _requests(rng)
    want = [_direct(spec, params, c, x) for c, x in requests]
    documents = [rng.integers(1, 256, n).tolist() for n in (0, 3, 16, 17, 40)]
    want_rolling = [sum(_direct(spec, params, c, x)[0] for c, x in map(disjoint, rolling_windows(d, 0, SEQ_LEN)))
                    for d in documents]
    # the full-sequence sum, without windows, for the documents that fit one window
    for d, total in zip(documents[1:3], want_rolling[1:3]):
        np.testing.assert_allclose(total, _direct(spec, params, [0], d)[0], rtol=1e-5)

    for mesh_cfg, batch_size in ((MeshConfig(data=1, fsdp=1, tensor=1), 3),
                                 (MeshConfig(data=2, fsdp=4, tensor=1), 8),
                                 (MeshConfig(data=2, fsdp=2, tensor=2), 4)):
        mesh, placed = _on(spec, params, mesh_cfg)
        scorer = Scorer(spec, mesh, SEQ_LEN, batch_size)
        got = scorer.continuations(placed, requests)
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=2e-5, atol=2e-5)
        assert [g[1] for g in got] == [w[1] for w in want]
        np.testing.assert_allclose(scorer.rolling(placed, documents, 0), want_rolling, rtol=2e-5, atol=2e-5)


def test_refusals(model):
    spec, params = model
    mesh, placed = _on(spec, params, MeshConfig(data=2, fsdp=4, tensor=1))
    with pytest.raises(ConfigError, match="eval.batch_size.*data\\*fsdp\\*expert = 8"):
        Scorer(spec, mesh, SEQ_LEN, 12)
    scorer = Scorer(spec, mesh, SEQ_LEN, 8)
    with pytest.raises(ValueError, match="request 1: empty context"):
        scorer.continuations(placed, [([1], [2]), ([], [3])])
    with pytest.raises(ValueError, match="continuation of 17 tokens"):
        scorer.continuations(placed, [([1], [2] * 17)])
    assert scorer.continuations(placed, []) == []
