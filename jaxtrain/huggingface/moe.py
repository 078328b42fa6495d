"""A mixture-of-experts model as Hugging Face Qwen3-MoE (`Qwen3MoeForCausalLM`), and back.

Qwen3-MoE is Qwen3 (QK-norm, GQA, half-split RoPE, untied head, no biases) whose sparse
layers replace the SwiGLU MLP by a router and routed SwiGLU experts, with no shared
expert. Its router computes what jaxtrain/model/moe.py computes, for a token x (d):

    z = x W^T, W (E, d)            p = softmax(z) in float32        (g, e) = top_k(p)
    g <- g / sum(g)  if norm_topk_prob                              y = sum_j g_j expert_{e_j}(x)

so the `model.moe` keys map one to one:

    n_experts   -> num_experts          top_k       -> num_experts_per_tok
    expert_d_ff -> moe_intermediate_size (model.d_ff where unset)
    renormalize -> norm_topk_prob       model.d_ff  -> intermediate_size (a dense layer's MLP)

jaxtrain's router computes z in float32 from float32 weights; transformers computes z in
the model's dtype (the same in float32, rounded in a bfloat16 export) and the softmax in
float32. The auxiliary losses (model.moe.aux_loss, router_z_loss) shape training only and
are not part of the exported function; import takes them from the importing config.

Which layers are sparse: transformers makes layer i (0-based) sparse iff num_experts > 0,
i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0. `sparse_layers` is
jaxtrain's side of that, the one place it is decided (today every block: decoder_sparse_step
1, no mlp_only_layers); import refuses any other pattern in one line naming the field.

Tensors, in the layout `save_pretrained` writes and hub checkpoints have (transformers 5
fuses the experts into (E, 2f, d) and (E, d, f) parameters when it loads them and splits
them again when it saves), for every sparse layer i and expert e:

    model.layers.{i}.mlp.gate.weight                    (E, d)  router, W_r^T
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight   (f, d)  w_gate[i, e]^T
    model.layers.{i}.mlp.experts.{e}.up_proj.weight     (f, d)  w_up[i, e]^T
    model.layers.{i}.mlp.experts.{e}.down_proj.weight   (d, f)  w_down[i, e]^T

Every factor of weights.fold_factors folds exactly: the router's role multiplier into the
router (z is linear in W_r, so the same logits pick the same experts with the same
gates), the hidden multiplier into each expert matrix (it scales the weight before its
matmul), the residual-branch multiplier into each expert's down projection (y is linear
in every down_e, and the gates are fixed by z).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt

from jaxtrain.config.errors import ConfigError
from jaxtrain.config.schema import ModelConfig

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
# jaxtrain parameter path -> tensor name in a sparse layer ({i}: layer, {e}: expert)
TENSORS = {
    "blocks.mlp.router": "model.layers.{i}.mlp.gate.weight",
    "blocks.mlp.w_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "blocks.mlp.w_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "blocks.mlp.w_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
}


def sparse_layers(model: ModelConfig) -> tuple[int, ...]:
    """The 0-based indices of the blocks whose MLP is a mixture of experts, in order; the
    stacked expert weights' layer j is Hugging Face layer sparse_layers(model)[j].

    Block i is sparse iff (i + 1) % model.moe.moe_every == 0, the rule of transformers'
    decoder_sparse_step, which `hf_fields` writes (export refuses moe_every > 1 for now,
    `check_exportable`)."""
    if not model.moe.enabled:
        return ()
    return tuple(i for i in range(model.n_layers) if (i + 1) % model.moe.moe_every == 0)


def check_exportable(model: ModelConfig, command: str) -> None:
    """What Qwen3-MoE cannot compute, one line naming the key (the first that applies)."""
    moe = model.moe
    refusals = {
        # Qwen2-MoE has a shared expert, but behind a sigmoid gate and without QK-norm
        "model.moe.n_shared_experts": (moe.n_shared_experts > 0,
                                       f"{moe.n_shared_experts}: Qwen3-MoE, the mixture-of-experts family "
                                       f"{command} writes, has no shared expert"),
        "model.qk_norm": (not model.qk_norm,
                          f"false: Qwen3-MoE, the mixture-of-experts family {command} writes, normalizes q and k "
                          f"per head (QK-norm); a MoE model without it has no Hugging Face family here yet"),
        # DeepSeek-V3's selection bias: Qwen3-MoE's router selects by the softmax alone
        "model.moe.bias_update_rate": (moe.bias_update_rate > 0,
                                       f"{moe.bias_update_rate}: Qwen3-MoE's router has no tensor for the "
                                       f"balance bias that chooses the top-k experts"),
        # the dense blocks in between live in a second stack (dense_blocks) not mapped yet
        "model.moe.moe_every": (moe.moe_every > 1,
                                f"{moe.moe_every}: {command} writes Qwen3-MoE with every block sparse; "
                                f"interleaved dense blocks are not mapped yet"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ConfigError(key, why)


def hf_fields(model: ModelConfig) -> dict[str, Any]:
    """The config.json fields Qwen3-MoE adds to Qwen3's (hub spelling: `num_experts`,
    which transformers 5 also reads; it writes `num_local_experts` itself)."""
    moe, sparse = model.moe, sparse_layers(model)
    step = sparse[0] + 1  # layer step - 1 is the first sparse one; (i + 1) % step == 0 must give the rest
    if sparse != tuple(i for i in range(model.n_layers) if (i + 1) % step == 0):
        raise ConfigError("model.moe", f"sparse layers {list(sparse)} are not every {step}th block "
                                       f"(Qwen3-MoE's decoder_sparse_step)")
    return {"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.expert_width(model.ff_dim), "norm_topk_prob": moe.renormalize,
            "decoder_sparse_step": step, "mlp_only_layers": [], "output_router_logits": False}


class HfExperts(BaseModel):
    """The Qwen3-MoE fields of a config.json that jaxtrain reads, typed (strict, as
    architecture.HfArchitecture). Absent fields take transformers' defaults, except the
    expert counts and width, which every real checkpoint writes."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    num_experts: int | None = None  # hub configs and transformers 4
    num_local_experts: int | None = None  # what transformers 5 writes for the same field
    num_experts_per_tok: PositiveInt
    moe_intermediate_size: PositiveInt
    norm_topk_prob: bool = False
    decoder_sparse_step: PositiveInt = 1
    mlp_only_layers: list[int] | None = None

    @property
    def experts(self) -> int | None:
        return self.num_experts if self.num_experts is not None else self.num_local_experts


def hf_sparse_layers(hf: HfExperts, n_layers: int) -> tuple[int, ...]:
    """The layers transformers builds with experts (module docstring)."""
    dense = set(hf.mlp_only_layers or ())
    return tuple(i for i in range(n_layers)
                 if (hf.experts or 0) > 0 and i not in dense and (i + 1) % hf.decoder_sparse_step == 0)


def unsupported(hf: HfExperts, n_layers: int) -> dict[str, tuple[bool, str]]:
    """field -> (refused, why): what jaxtrain's model.moe cannot hold."""
    experts, sparse = hf.experts, hf_sparse_layers(hf, n_layers)
    dense = [i for i in range(n_layers) if i not in sparse]
    listed = [i for i in (hf.mlp_only_layers or ()) if 0 <= i < n_layers]
    both = None not in (hf.num_experts, hf.num_local_experts) and hf.num_experts != hf.num_local_experts
    pattern = f"unsupported: layers {dense} have a dense MLP; jaxtrain's model.moe puts experts in every block"
    return {
        "num_experts": (experts is None or experts <= 0 or both,
                        "missing (a required field)" if experts is None else
                        f"{experts} differs from num_local_experts {hf.num_local_experts}" if both else
                        f"{experts}: unsupported: a Qwen3-MoE model without experts (export it as qwen3)"),
        "num_experts_per_tok": (experts is not None and hf.num_experts_per_tok > experts,
                                f"{hf.num_experts_per_tok} exceeds num_experts {experts}"),
        "mlp_only_layers": (bool(listed), pattern),
        "decoder_sparse_step": (bool(dense), pattern),
    }


def moe_fields(hf: HfExperts) -> dict[str, Any]:
    """jaxtrain `model.moe.*` values of a Qwen3-MoE config.json (every layer sparse)."""
    return {"n_experts": hf.experts, "top_k": hf.num_experts_per_tok, "expert_d_ff": hf.moe_intermediate_size,
            "renormalize": hf.norm_topk_prob, "n_shared_experts": 0}
