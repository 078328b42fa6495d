"""Model FLOPs per token: what model-FLOPs utilisation (`jaxtrain bench`) and the roofline
(`communication.roofline`) divide by a device's peak FLOP/s (`accelerators.py`).

Model FLOPs (Chowdhery et al. 2022, "PaLM", App. B) count the matmuls of one training
step, forward and backward, per token, whatever the implementation actually executes
(rematerialisation does not raise them):

    F = 6 N + 12 L H d_head T

    N   parameters in matmuls: per layer q, k, v, o and the three SwiGLU matrices, plus the
        untied LM head (the embedding is a gather, not a matmul, so it is not counted);
        in a MoE block (model.moe: every block, or one in moe_every), the parameters ONE
        token uses (active): the router and the SwiGLU matrices of its top_k experts and
        of the shared expert; the other blocks count their dense SwiGLU (model.d_ff);
    6   2 FLOPs per multiply-add, times 3 for the forward and the two backward matmuls;
    12 L H d_head T   attention scores Q K^T and the weighted sum A V over all T keys
        (2 matmuls x 2 FLOPs x 3 passes), counted for the full T x T square as PaLM does,
        although causal masking makes half of it redundant.

MFU = F * tokens/s / peak FLOP/s (`accelerators.peak_flops`: the vendors' dense figures, or a
measured matmul rate on CPU).
"""

from __future__ import annotations

from jaxtrain.config.schema import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """N: parameters that take part in a matmul (all but the embedding and norm gains)."""
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2  # q, o and k, v
    moe_blocks = len(cfg.moe.moe_blocks(cfg.n_layers))
    moe_mlp = 3 * d * cfg.moe.active_width(cfg.ff_dim) + d * cfg.moe.n_experts  # with its router
    dense_mlp = 3 * d * cfg.ff_dim
    return cfg.n_layers * attention + moe_blocks * moe_mlp + (cfg.n_layers - moe_blocks) * dense_mlp + \
        d * cfg.vocab_size


def idle_expert_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use: the SwiGLU matrices of the n_experts - top_k routed
    experts it is not sent to, in every layer (0 for the dense model). Total minus these
    is the active parameter count (`jaxtrain dry-run`)."""
    moe = cfg.moe
    if not moe.enabled:
        return 0
    return cfg.n_layers * 3 * cfg.d_model * moe.expert_width(cfg.ff_dim) * (moe.n_experts - moe.top_k)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """F = 6 N + 12 L H d_head T (see the module docstring)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)
