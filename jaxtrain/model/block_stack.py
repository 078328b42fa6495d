"""The blocks, stored stacked by kind and run as one scan over groups of blocks.

A model's n_layers blocks repeat in groups of g = model.moe.group_size blocks (moe_every
with experts, 1 otherwise): g - 1 dense blocks, then one block with the model's MLP (a
mixture of experts when model.moe is on). So block i (0-based) is a MoE block iff
(i + 1) % g == 0, Hugging Face Qwen3-MoE's `decoder_sparse_step` convention.

Storage: each kind of block is one module created under `nnx.vmap` (`stacked`), so each of
its weights has a leading `layers` axis (the params, the optimizer state, the checkpoints):

    blocks        the n_layers / g blocks with the model's MLP: every block when g = 1, so a
                  dense model and a MoE model without interleaving keep the tree they had
    dense_blocks  the n_layers (g - 1) / g dense SwiGLU blocks between them (g > 1 only)

Entry e of `blocks` is block e g + g - 1; entry e of `dense_blocks` is block
(e // (g - 1)) g + e % (g - 1) (`block_ids`: per-layer names, telemetry and inspection
report blocks by that index).

Forward (`scan_groups`): ONE `lax.scan` over the n_layers / g groups. Its xs are the
`blocks` weights (leading axis = groups) and the `dense_blocks` weights reshaped to
(groups, g - 1, ...) (free: the layers axis is never sharded); the body runs the group's
g - 1 dense blocks, then its last block, each rematerialised on its own (so the backward
pass keeps what it kept per block before). XLA compiles one group whatever the depth.
What the blocks sow comes back in model order, (n_layers, ...), except what only the
MoE blocks sow (the router statistics): (n_layers / g, ...), one row per MoE block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ModelConfig

MAIN = "blocks"  # the stack of the blocks with the model's MLP (the Transformer's attribute)
DENSE = "dense_blocks"  # the stack of the dense blocks between them, when interleaved

# (block, x, its index in the model) -> (x, {name: what the block sowed})
RunBlock = Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def stack_sizes(model: ModelConfig) -> dict[str, int]:
    """Blocks per stack: {MAIN: n_layers / g} and, interleaved, {DENSE: n_layers (g - 1) / g}."""
    group, n = model.moe.group_size, model.n_layers
    return {MAIN: n // group, **({DENSE: n - n // group} if group > 1 else {})}


def block_ids(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Stack name -> the model index of each of its entries, in stack order."""
    ids = {name: [] for name in stack_sizes(model)}
    for index in range(model.n_layers):
        ids[locate(model, index)[0]].append(index)
    return {name: tuple(found) for name, found in ids.items()}


def locate(model: ModelConfig, index: int) -> tuple[str, int]:
    """(stack, entry) of block `index` of the model."""
    group = model.moe.group_size
    number, position = divmod(index, group)
    if position == group - 1:
        return MAIN, number
    return DENSE, number * (group - 1) + position


def stacked(make_block: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` blocks made by `make_block`, as one module whose weights have a leading
    `layers` axis (their logical axis, in the `out_sharding` metadata)."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_block(layer_rngs)

    return make(rngs.split(count))


def scan_groups(main: nnx.Module, dense: nnx.Module | None, group: int, x: jax.Array, run_block: RunBlock,
                remat_policy: Callable, unrolled: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x through every block in model order: one scan over the groups (see the module
    docstring), each block under `jax.checkpoint(policy=remat_policy)`; `unrolled` unrolls
    the scan (the same program, compiled once per group). Returns x and what the blocks
    sowed, stacked in model order."""
    main_def, main_weights = nnx.split(main)
    groups = jax.tree.leaves(main_weights)[0].shape[0]
    checkpointed = lambda graphdef: jax.checkpoint(  # noqa: E731
        lambda weights, x, index: run_block(nnx.merge(graphdef, weights), x, index),
        policy=remat_policy, prevent_cse=False)
    run_main, xs = checkpointed(main_def), {MAIN: main_weights}
    if dense is not None:
        dense_def, dense_weights = nnx.split(dense)
        run_dense = checkpointed(dense_def)
        xs[DENSE] = jax.tree.map(lambda w: w.reshape(groups, group - 1, *w.shape[1:]), dense_weights)

    def one_group(x: jax.Array, inputs: tuple) -> tuple[jax.Array, tuple[list[dict], dict]]:
        weights, number = inputs
        dense_found = []
        for position in range(group - 1):
            entry = jax.tree.map(lambda w: w[position], weights[DENSE])
            x, found = run_dense(entry, x, number * group + position)
            dense_found.append(found)
        x, main_found = run_main(weights[MAIN], x, number * group + group - 1)
        return x, (dense_found, main_found)

    x, (dense_found, main_found) = jax.lax.scan(one_group, x, (xs, jnp.arange(groups)),
                                                unroll=groups if unrolled else 1)
    return x, _in_model_order(dense_found, main_found)


def _in_model_order(dense_found: list[dict[str, jax.Array]], main_found: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-group sowings ((groups, ...) per dense position, and for the last block) as one
    (n_layers, ...) stack per name; a name only the last block of a group sows (the
    routers' statistics) stays (groups, ...)."""
    out = {}
    for name, last in main_found.items():
        if dense_found and name in dense_found[0]:
            every = jnp.stack([found[name] for found in dense_found] + [last], axis=1)  # (groups, g, ...)
            out[name] = every.reshape(-1, *every.shape[2:])
        else:
            out[name] = last
    return out
