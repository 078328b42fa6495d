"""Causal self-attention kernels, and the one rule choosing among them (`kernel_for`).

    out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, s, n // G]) v[b, s, n // G]
    over the keys s <= t of t's document,  G = n_heads / n_kv_heads (GQA, Ainslie et al. 2023)

q, k, v arrive QK-normed and rotated (transformer.Attention._qkv); `scale` is the
parametrization's attention-logit scale (1/d_head under muP, 1/sqrt(d_head) under SP).
Packed rows carry segment ids (B, T): a token sees only the keys with its own id.

    xla     jax.nn.dot_product_attention(implementation="xla"): the quadratic reference;
            holds the (B, N, T, T) scores and probabilities, and under packing the
            (B, 1, T, T) document mask built from the segment ids.
    cudnn   cuDNN flash attention (Dao 2023, "FlashAttention-2") through
            jax.nn.dot_product_attention(implementation="cudnn"): no T x T scores. Packing
            reaches it as the document mask, which JAX turns into an additive bias read by the
            kernel (one (B, 1, T, T) array per step, shared by every head and layer). jax 0.10.2's
            other packed form, per-document offsets and lengths (q_offsets / q_seqlen), needs a
            static bound M on documents per row and keeps softmax statistics of B*M*N*T floats:
            with no bound on documents (M = T) that is the T x T array flash attention avoids.
    splash  the Pallas splash attention kernel on TPU (Mosaic), with the segment ids as its
            SegmentIds (no mask array). Pallas kernels are not partitioned by XLA's SPMD
            partitioner, so it runs under `jax.shard_map` on the model's mesh: batch over
            data x fsdp x expert, heads over tensor (the compute rules of model/sharding.py). It takes
            no scale argument: q is scaled before the call.

`max_logit` and `weights` (telemetry, attention maps) compute the scores beside the kernel
with the same visibility rule, a chunk of queries at a time.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtrain.config.errors import ConfigError
from jaxtrain.model.sharding import COMPUTE_RULES, logical_to_spec

KERNELS = ("xla", "cudnn", "splash")
HALF_DTYPES = ("bfloat16", "float16")
_SCORE_CHUNK = 256  # queries per piece of the max attention logit: no (T, T) scores held at once
_SPLASH_BLOCK = 512  # splash's largest query / key tile (`splash_tiles`); TPU tiles are multiples of 128
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN's flash limit before Hopper (256 from compute capability 9.0)
# The cuDNN version JAX is told when it traces for a GPU target from a machine without one
# (JAX only compares it with 9.10 / 9.11 for features jaxtrain does not use).
_TARGET_CUDNN_VERSION = 91000


def kernel_for(requested: str, platform: str, dtype: str, head_dim: int, seq_len: int) -> str:
    """The kernel that runs `model.attention: requested` on devices of `platform` ("cpu",
    "gpu", "tpu") in compute dtype `dtype` at these shapes. `auto`: cuDNN on GPU in half
    precision where its shape rules allow, splash on TPU where its tiles divide the
    sequence, XLA otherwise. An explicit kernel that cannot run is a ConfigError."""
    reasons = {"cudnn": _cudnn_refusal(platform, dtype, head_dim, seq_len),
               "splash": _splash_refusal(platform, seq_len), "xla": None}
    if requested == "auto":
        preferred = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
        return preferred if reasons[preferred] is None else "xla"
    if requested not in reasons:
        raise ConfigError("model.attention", f"unknown kernel {requested!r}; one of auto, {', '.join(KERNELS)}")
    if reasons[requested] is not None:
        raise ConfigError("model.attention", f"{requested} cannot run here: {reasons[requested]}")
    return requested


def _cudnn_refusal(platform: str, dtype: str, head_dim: int, seq_len: int) -> str | None:
    if platform != "gpu":
        return f"cuDNN needs a GPU (the step is compiled for {platform})"
    if dtype not in HALF_DTYPES:
        return f"cuDNN flash attention needs model.dtype bfloat16 (the compute dtype is {dtype})"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"head_dim {head_dim} must be a multiple of 8 and at most {_CUDNN_MAX_HEAD_DIM}"
    if seq_len % 2:
        return f"data.seq_len {seq_len} must be even (cuDNN's rule for a bias in training)"
    return None


def _splash_refusal(platform: str, seq_len: int) -> str | None:
    if platform != "tpu":
        return f"splash attention is a TPU kernel (the step is compiled for {platform})"
    if seq_len % 128:
        return f"data.seq_len {seq_len} must be a multiple of 128 (splash attention's tiles)"
    return None


def attend(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           scale: float) -> jax.Array:
    """Causal attention (B, T, N, D) of q (B, T, N, D), k and v (B, T, K, D) by `kernel`."""
    if kernel == "splash":
        return splash_attention(q, k, v, segment_ids, scale)
    arguments = dot_product_arguments(segment_ids, scale)
    if kernel == "cudnn":
        with _cudnn_for_target():
            return jax.nn.dot_product_attention(q, k, v, **arguments, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, **arguments, implementation="xla")


def document_mask(segment_ids: jax.Array) -> jax.Array:
    """(B, 1, T, T): query t may see key s of the same document (the causal part is separate)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def dot_product_arguments(segment_ids: jax.Array | None, scale: float) -> dict:
    """What jaxtrain gives jax.nn.dot_product_attention, the same for cuDNN and XLA: causal,
    the parametrization's scale, and under packing the document mask (see the module docstring)."""
    mask = None if segment_ids is None else document_mask(segment_ids)
    return {"mask": mask, "is_causal": True, "scale": scale}


@contextlib.contextmanager
def _cudnn_for_target():
    """JAX asks the local machine for its cuDNN version before tracing a cuDNN call. Tracing
    for GPU devices from a machine without one (a deviceless compile for a GPU target) it
    would find none and refuse; there it is told `_TARGET_CUDNN_VERSION` instead. JAX's
    compute-capability checks answer "before Hopper" there, the stricter rules
    (`kernel_for` applies them). On a GPU nothing changes."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_module  # noqa: PLC0415 (private)
    if jax.default_backend() == "gpu":
        yield
        return
    original = cudnn_module.check_cudnn_version
    cudnn_module.check_cudnn_version = lambda: _TARGET_CUDNN_VERSION
    try:
        yield
    finally:
        cudnn_module.check_cudnn_version = original


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     scale: float, interpret: bool = False) -> jax.Array:
    """The splash kernel under shard_map on the current mesh (any mesh, or none). Where the
    tensor axis splits the query heads but not the kv heads, each kv head is first repeated
    for its queries (GQA as MHA) so that each device holds the kv heads its queries read.
    `interpret`: Pallas interpret mode (the tests, on CPU); never chosen from this process's
    backend, which is "cpu" in a deviceless compile for TPU."""
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    per_shard = functools.partial(_splash_local, interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return per_shard(q, k, v, segment_ids)
    q_spec = logical_to_spec(("batch", "sequence", "heads", "head_dim"), q.shape, mesh, COMPUTE_RULES)
    kv_spec = logical_to_spec(("batch", "sequence", "kv_heads", "head_dim"), k.shape, mesh, COMPUTE_RULES)
    if q_spec[2] is not None and kv_spec[2] is None:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    segment_spec = None if segment_ids is None else P(q_spec[0], None)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                  interpret: bool) -> jax.Array:
    """One device's rows and heads: per kv head, its G query heads as splash's multi-query
    kernel (heads, T, D) x (T, D), mapped over batch and kv heads."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415 (TPU kernel)
    batch, seq, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    block = splash_tiles(seq)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(groups)])
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    q = q.reshape(batch, seq, k.shape[2], groups, head_dim).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, D)

    def one_row(q_row, k_row, v_row, segments):
        ids = None if segments is None else splash.SegmentIds(q=segments, kv=segments)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segment_ids)  # (B, K, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


def scores(q: jax.Array, k: jax.Array, segment_ids: jax.Array | None, scale: float,
           start: int = 0) -> jax.Array:
    """scale * q.k (B, N, Tq, Tk) in float32 of queries start.., -inf where a key is hidden
    (later, or in another document); query head n reads kv head n // G."""
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = scale * jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    queries = start + jnp.arange(q.shape[1])
    visible = (queries[:, None] >= jnp.arange(k.shape[1]))[None, None]
    if segment_ids is not None:
        own = segment_ids[:, start:start + q.shape[1]]
        visible = visible & (own[:, :, None] == segment_ids[:, None, :])[:, None]
    return jnp.where(visible, logits, -jnp.inf)


def weights(q: jax.Array, k: jax.Array, segment_ids: jax.Array | None, scale: float) -> jax.Array:
    """The attention probabilities (B, N, T, T) (the notebook's attention maps)."""
    return jax.nn.softmax(scores(q, k, segment_ids, scale), axis=-1)


def max_logit(q: jax.Array, k: jax.Array, segment_ids: jax.Array | None, scale: float) -> jax.Array:
    """The largest logit a query gives a key it sees: its growth precedes attention-logit
    divergence (Wortsman et al. 2023). Queries go `_SCORE_CHUNK` at a time."""
    chunks = range(0, q.shape[1], _SCORE_CHUNK)
    return jnp.max(jnp.stack([jnp.max(scores(q[:, s:s + _SCORE_CHUNK], k, segment_ids, scale, s))
                              for s in chunks]))


def splash_tiles(seq_len: int) -> int:
    """Splash's query and key tile: the whole sequence up to 512 tokens, else the largest
    divisor of T dividing 512 (a multiple of 128 where T is, as `kernel_for` requires)."""
    return seq_len if seq_len <= _SPLASH_BLOCK else math.gcd(seq_len, _SPLASH_BLOCK)
