"""Packed documents: each document in a packed row has exactly the loss it has alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.data import pipeline
from jaxtrain.data.prepare import prepare
from jaxtrain.data.sources import open_sources


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """Real text cut into documents of 20..120 bytes, so a 256-token row holds several."""
    root = tmp_path_factory.mktemp("short")
    text = b"".join(p.read_bytes() for p in sorted((TINY.parents[1] / "jaxtrain").glob("*.py")))
    rng, start, i = np.random.default_rng(0), 0, 0
    (root / "docs").mkdir()
    while start < min(len(text), 200_000):
        length = int(rng.integers(20, 120))
        (root / "docs" / f"{i:05d}.txt").write_bytes(text[start:start + length])
        start, i = start + length, i + 1
    prepare([str(root / "docs" / "*.txt")], str(root / "store"), val_fraction=0.1)
    return root / "store"


def _nll(logits, targets):
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.slow
def test_packed_rows_give_every_document_its_unpacked_loss(short_documents):
    cfg = load_config(TINY, [f"data.sources=[{{path: '{short_documents}'}}]", "data.packing=true",
                             "data.seq_len=256", "train.batch_size=4"])
    batch = next(pipeline.TrainBatches(cfg, open_sources(cfg)))
    tokens, segments = batch["tokens"], batch["segment_ids"]
    assert segments.max() >= 3  # several documents per row
    spec = ts.model_spec(cfg)
    params = jax.jit(lambda key: ts.init_params(cfg, spec, key))(jax.random.PRNGKey(0))

    @jax.jit
    def nll(params, rows, row_segments=None):
        logits = ts.bind_model(spec, params)(rows[:, :-1], segment_ids=row_segments)
        return _nll(logits, rows[:, 1:])

    packed = nll(params, tokens, segments[:, :-1])
    unmasked = nll(params, tokens)
    # every document alone at the start of its own row (causal: the zero padding after it is unseen)
    docs = [(r, np.flatnonzero(segments[r] == d)) for r in range(len(tokens)) for d in np.unique(segments[r])]
    docs = [(r, where) for r, where in docs if len(where) > 1]
    alone_rows = np.zeros((len(docs), tokens.shape[1]), np.int32)
    for k, (r, where) in enumerate(docs):
        alone_rows[k, :len(where)] = tokens[r, where]
    alone = nll(params, alone_rows)
    alone_sum, alone_count, largest_leak = 0.0, 0, 0.0
    for k, (r, where) in enumerate(docs):
        inside = where[:-1]  # positions whose target is in the same document
        mine = alone[k, :len(inside)]
        np.testing.assert_allclose(packed[r, inside], mine, rtol=1e-5, atol=1e-5)
        largest_leak = max(largest_leak, float(jnp.max(jnp.abs(unmasked[r, inside] - mine))))
        alone_sum, alone_count = alone_sum + float(mine.sum()), alone_count + len(inside)
    assert largest_leak > 1e-3  # without segment ids documents do see each other
    # the batch loss is the mean over within-document targets, each as if its document were alone
    loss = jax.jit(lambda p, b: ts.loss_and_metrics(p, spec, b, 0.0)[1]["loss"])(params, batch)
    np.testing.assert_allclose(float(loss), alone_sum / alone_count, rtol=1e-5)


def test_segment_positions_restart_at_every_document():
    from jaxtrain.model.attention import document_mask
    from jaxtrain.model.transformer import segment_positions

    segments = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3]])
    positions, mask = segment_positions(segments, segments.shape), document_mask(segments)
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 0, 1, 0, 1, 2])
    assert mask.shape == (1, 1, 8, 8) and bool(mask[0, 0, 4, 3]) and not bool(mask[0, 0, 5, 4])
