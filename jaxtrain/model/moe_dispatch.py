"""Dropless dispatch of a mixture of experts: every (token, chosen expert) assignment
computed, none dropped, on one device or across an `expert` mesh axis.

On one device (`dropless_experts`; Gale et al. 2023, "MegaBlocks"): the N tokens
are replicated k times (N*k assignments, a = n*k + j for token n's j-th choice), sorted by
expert id, the experts applied to their contiguous groups by `jax.lax.ragged_dot`
(stacked weights G, U: [E, d, f], D: [E, f, d], group sizes = assignments per expert),
un-sorted, weighted by the gates and summed over the k choices:

    y_n = sum_j g_nj * D_e (silu(x_n G_e) * (x_n U_e)),   e = e_nj

Expert parallel (`exchanged_experts`; Lepikhin et al. 2020, "GShard"; Fedus et al. 2021,
"Switch Transformers", Sec. 2.2): the X devices along the `expert` mesh axis hold
E_l = E / X experts each (device x: experts x*E_l .. (x+1)*E_l - 1) and N tokens each (the
axis is a data axis for everything else). Each device sorts its N*k assignments by expert,
so those for shard s are one contiguous run of length n_s, and exchanges them:

    counts     all_to_all of the (X, E_l) assignment counts: each device learns how many
               rows every source sends to each of its local experts (4 E bytes)
    dispatch   all_to_all of a (X, C, d) buffer: slot (s, c) = the token of the c-th
               assignment for shard s, zero past n_s
    experts    the received (X, C, d) rows regrouped by local expert (`ragged_dot`)
    combine    all_to_all of the (X, C, d) outputs back to their sources, which un-sort
               them and sum them with the gates as on one device

The exchange is fixed-size, so the per-(source, destination) capacity is the dropless worst
case: a token's k choices are distinct experts, at most min(k, E_l) of them on one shard, so

    C = N * min(k, E_l)          n_s <= C for every shard s: nothing is ever dropped

Bytes per device per MoE layer, b = bytes of the compute dtype (the all_to_all output):

    forward    2 * X * C * d * b        dispatch + combine (+ 4 E for the counts)
    backward   2 * X * C * d * b        their transposes, all_to_alls of the same shape
    (the remat policies `full` and `dots_saveable` keep neither exchange's output: the
    backward pass runs the forward two again, 6 X C d b in all; `none` keeps them)

X * C = X N min(k, E_l) is the number of tokens on the whole expert group times min(k, E_l):
expert parallelism moves activations, and as many whatever X (tools/communication.py books
it). The same buffer of real rows, N k on average, is what `jax.lax.ragged_all_to_all`
would move; XLA:CPU does not implement it (jax 0.10.2: "HLO opcode `ragged-all-to-all` is
not supported by XLA:CPU ThunkEmitter"), so the fixed all_to_all keeps one program, and its
tests, on every backend. The experts then compute X * C rows, of which the padding ones
are outside every ragged_dot group (zero output, no FLOPs on GPU/TPU grouped matmuls).

Everything runs under `jax.shard_map` (`dropless_on_devices`); its weight shards are
gathered over fsdp there (ZeRO-3: `_gather`, whose transpose is the gradient's
reduce-scatter, in the compute dtype), the hidden width stays split over `tensor` and the
partial outputs are summed over it (Megatron's all-reduce).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtrain.model.sharding import COMPUTE_RULES, STORAGE_RULES, logical_to_spec

Axes = tuple[str | None, ...]


def apply_experts(rows: jax.Array, sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """SwiGLU of expert e on the e-th contiguous group of `rows` (group sizes `sizes`, in
    expert order); rows past sum(sizes) are in no group and come out zero."""
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up, sizes)
    return jax.lax.ragged_dot(hidden, w_down, sizes)


def _sorted_by_expert(experts: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """(order, counts): sorted position -> assignment n*k + j, stable, by expert id; and
    the number of assignments of each expert."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=n_experts).astype(jnp.int32)


def _combined(sorted_outputs: jax.Array, order: jax.Array, gates: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The expert outputs (in sorted order) back in assignment order, weighted by the gates
    and summed over each token's k choices: (N*k, d) -> (N, d)."""
    n, k = gates.shape
    unsorted = jnp.take(sorted_outputs, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted.astype(jnp.float32), gates).astype(dtype)


def dropless_experts(tokens: jax.Array, experts: jax.Array, gates: jax.Array, w_gate: jax.Array,
                     w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """sum_j gates_j * SwiGLU_{experts_j}(token) with every expert here: (N, d) -> (N, d)."""
    order, sizes = _sorted_by_expert(experts, w_gate.shape[0])
    grouped = jnp.take(tokens, order // experts.shape[1], axis=0)  # (N*k, d), grouped by expert
    return _combined(apply_experts(grouped, sizes, w_gate, w_up, w_down), order, gates, tokens.dtype)


def exchanged_experts(tokens: jax.Array, experts: jax.Array, gates: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, axis: str | tuple[str, ...]) -> jax.Array:
    """`dropless_experts` with the experts split over mesh `axis` (inside shard_map: the
    weights are this device's E_l experts), the assignments exchanged by all_to_all (module
    docstring): (N, d) -> (N, d), the same sum."""
    n, k = experts.shape
    local, shards = w_gate.shape[0], jax.lax.axis_size(axis)
    capacity = n * min(k, local)
    order, counts = _sorted_by_expert(experts, local * shards)
    sent = counts.reshape(shards, local)  # (X, E_l): assignments to each shard's experts
    per_shard = jnp.sum(sent, axis=1)
    starts = jnp.cumsum(per_shard) - per_shard  # each shard's run in sorted order
    slot = jnp.arange(capacity)
    position = jnp.minimum(starts[:, None] + slot, n * k - 1)  # (X, C) sorted position per slot
    rows = jnp.take(tokens, jnp.take(order, position) // k, axis=0)
    rows = jnp.where((slot < per_shard[:, None])[..., None], rows, jnp.zeros((), rows.dtype))
    exchange = lambda x: jax.lax.all_to_all(x, axis, 0, 0, tiled=True)  # noqa: E731 - [s] <-> [source]
    received, received_counts = exchange(rows), exchange(sent)  # (X, C, d), (X, E_l) by source
    outputs = _local_experts(received, received_counts, w_gate, w_up, w_down)
    returned = exchange(outputs).reshape(shards * capacity, -1)  # [s * C + c]: slot (s, c)'s output
    shard_of = jnp.take(experts.reshape(-1), order) // local  # sorted position -> its shard
    slot_of = shard_of * capacity + jnp.arange(n * k) - jnp.take(starts, shard_of)
    return _combined(jnp.take(returned, slot_of, axis=0), order, gates, tokens.dtype)


def _local_experts(received: jax.Array, received_counts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """This device's experts on the rows every source sent ((X, C, d): source s's rows
    sorted by local expert, received_counts[s, e] of expert e, zero padding after), the
    outputs in the same slots."""
    shards, capacity, d = received.shape
    ends = jnp.cumsum(received_counts, axis=1)  # (X, E_l)
    expert_of = jnp.sum(jnp.arange(capacity)[None, :, None] >= ends[:, None, :], axis=-1)  # E_l: padding
    regroup = jnp.argsort(expert_of.reshape(-1), stable=True)  # padding sorts last, outside every group
    rows = jnp.take(received.reshape(-1, d), regroup, axis=0)
    outputs = apply_experts(rows, jnp.sum(received_counts, axis=0), w_gate, w_up, w_down)
    return jnp.take(outputs, jnp.argsort(regroup), axis=0).reshape(shards, capacity, d)


def dropless_on_devices(tokens: jax.Array, experts: jax.Array, gates: jax.Array,
                        weights: tuple[jax.Array, jax.Array, jax.Array], weight_axes: Sequence[Axes]) -> jax.Array:
    """`dropless_experts` run by every device on its own tokens (`jax.shard_map` over the
    batch axes, data x fsdp x expert); `weights` (gate, up, down, logical axes `weight_axes`)
    are the stored shards, cast to the compute dtype. Each device all-gathers them over the
    mesh axes the storage layout adds to the compute layout (fsdp: ZeRO-3's gather, whose
    transpose is the gradient's reduce-scatter, in the compute dtype); where the compute
    layout splits the experts (over `expert`) the assignments are exchanged
    (`exchanged_experts`); the hidden width stays split over `tensor` where the rules split
    `mlp`, and the partial outputs are summed over it (Megatron's all-reduce). A sort over
    the global tokens instead leaves XLA to gather every token onto every device and compute
    all of them there (measured on a fsdp=8 step: 42 MB of all-reduce per device, 0.13 MB
    now). The layer's remat policy keeps no all-gather output (transformer._REMAT_POLICIES),
    so the backward pass gathers the weights again (ZeRO-3). No mesh, or one device: the
    plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return dropless_experts(tokens, experts, gates, *weights)
    rows = P(logical_to_spec(("batch",), (tokens.shape[0],), mesh, COMPUTE_RULES)[0], None)
    stored = [logical_to_spec(axes, w.shape, mesh, STORAGE_RULES) for w, axes in zip(weights, weight_axes)]
    computed = [logical_to_spec(axes, w.shape, mesh, COMPUTE_RULES) for w, axes in zip(weights, weight_axes)]
    expert_split, hidden_split = _mesh_axes(computed[0][0]), _mesh_axes(computed[2][1])  # E, and w_down's f

    def local(tokens: jax.Array, experts: jax.Array, gates: jax.Array, *shards: jax.Array) -> jax.Array:
        whole = [_gather(w, s, c) for w, s, c in zip(shards, stored, computed)]
        # the tokens meet tensor-split weights: marked as such here, the backward pass sums
        # their gradient over `tensor` once, on these (N, d), not on each (X * C, d) matmul input
        tokens = jax.lax.pcast(tokens, hidden_split, to="varying")
        if expert_split:
            out = exchanged_experts(tokens, experts, gates, *whole, axis=expert_split)
        else:
            out = dropless_experts(tokens, experts, gates, *whole)
        return jax.lax.psum(out, hidden_split) if hidden_split else out

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, *stored), out_specs=rows)(
        tokens, experts, gates, *weights)


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _gather(shard: jax.Array, stored: P, computed: P) -> jax.Array:
    """A weight's shard all-gathered, dimension by dimension, from its storage layout to its
    compute layout (inside shard_map)."""
    for dim, (compute_axes, storage_axes) in enumerate(zip(computed, stored)):
        extra = tuple(a for a in _mesh_axes(storage_axes) if a not in _mesh_axes(compute_axes))
        if extra:
            shard = jax.lax.all_gather(shard, extra, axis=dim, tiled=True)
    return shard
