"""The `model.moe` section: mixture-of-experts MLPs (jaxtrain/model/moe.py).

    model:
      moe:
        n_experts: 8          # 0 (the default): the dense SwiGLU model, nothing changes
        top_k: 2              # experts per token
        expert_d_ff: 256      # each expert's SwiGLU width (None: model.d_ff, or its default)
        n_shared_experts: 0   # always-on SwiGLU of width n_shared_experts * expert_d_ff
        renormalize: true     # top-k gates renormalised to sum to 1 (false: OLMoE)
        aux_loss: 0.01        # Switch load-balancing loss coefficient
        router_z_loss: 0.001  # ST-MoE router z-loss coefficient
        moe_every: 1          # block i is MoE iff (i + 1) % moe_every == 0; the others dense
        bias_update_rate: 0.0 # auxiliary-loss-free balancing bias step u (0: off; DeepSeek-V3 0.001)

With n_experts > 0 block i (0-based) has a mixture of experts iff (i + 1) % moe_every == 0
(Hugging Face Qwen3-MoE's `decoder_sparse_step`): 1, every block; 2, blocks 1, 3, 5, ...,
the others keeping the dense SwiGLU of width model.d_ff. model.n_layers must be a multiple
of moe_every (config/checks.py). The section is part of the model's identity: a checkpoint
resumes only under the same values (jaxtrain/config/resume.py compares it key by key).

The keys are validated like the rest of the schema (jaxtrain/config/schema.py): a bad value
is one line naming `model.moe.<key>`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jaxtrain.config.errors import ConfigError


class MoEConfig(BaseModel):
    # the settings of schema._Section (not imported: schema.py imports this module)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    n_experts: int = Field(0, ge=0)  # routed experts per block; 0 = dense model
    top_k: int = Field(2, ge=1)  # experts each token is sent to (<= n_experts)
    # Hidden width of each expert's SwiGLU (None = the dense MLP's width, model.d_ff or its default).
    expert_d_ff: int | None = Field(None, gt=0)
    # Shared experts (DeepSeek-V3): one always-on SwiGLU of width n_shared_experts * expert_d_ff.
    n_shared_experts: int = Field(0, ge=0)
    # Renormalise the selected top-k router probabilities to sum to 1 (Mixtral, Qwen3-MoE
    # norm_topk_prob); false keeps the raw softmax probabilities (OLMoE).
    renormalize: bool = True
    aux_loss: float = Field(0.01, ge=0)  # Switch load-balancing loss coefficient
    router_z_loss: float = Field(0.001, ge=0)  # ST-MoE router z-loss coefficient
    # Block i is a MoE block iff (i + 1) % moe_every == 0 (Qwen3-MoE's decoder_sparse_step).
    moe_every: int = Field(1, ge=1)
    # Auxiliary-loss-free load balancing (DeepSeek-V3): after every step each expert's
    # selection bias moves by bias_update_rate towards balance (model/moe.py); 0 = no bias.
    bias_update_rate: float = Field(0.0, ge=0)

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, top_k: int, info: ValidationInfo) -> int:
        n_experts = info.data.get("n_experts")
        if n_experts and top_k > n_experts:
            raise ValueError(f"top_k={top_k} exceeds n_experts={n_experts} (each token picks top_k distinct experts)")
        return top_k

    @field_validator("n_shared_experts")
    @classmethod
    def _shared_needs_routed(cls, shared: int, info: ValidationInfo) -> int:
        if shared and info.data.get("n_experts") == 0:
            raise ValueError(f"n_shared_experts={shared} needs routed experts: set model.moe.n_experts > 0")
        return shared

    @field_validator("moe_every", "bias_update_rate")
    @classmethod
    def _needs_routed(cls, value: float, info: ValidationInfo) -> float:
        off = {"moe_every": 1, "bias_update_rate": 0.0}[info.field_name]
        if value != off and info.data.get("n_experts") == 0:
            raise ValueError(f"{info.field_name}={value} needs routed experts: set model.moe.n_experts > 0")
        return value

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    @property
    def group_size(self) -> int:
        """Blocks per repeating group: moe_every - 1 dense blocks, then one MoE block (1 for
        a dense model: every block is alike)."""
        return self.moe_every if self.enabled else 1

    def is_moe_block(self, index: int) -> bool:
        """Whether block `index` (0-based) has a mixture of experts: (index + 1) % moe_every == 0."""
        return self.enabled and (index + 1) % self.moe_every == 0

    def moe_blocks(self, n_layers: int) -> tuple[int, ...]:
        """The indices of the MoE blocks among n_layers (what their sown statistics are, in order)."""
        return tuple(index for index in range(n_layers) if self.is_moe_block(index))

    def expert_width(self, dense_ff: int) -> int:
        """Each expert's SwiGLU width: expert_d_ff, else the dense MLP's (`ModelConfig.ff_dim`)."""
        return self.expert_d_ff or dense_ff

    def active_width(self, dense_ff: int) -> int:
        """The SwiGLU width one token passes through: the dense MLP's, or top_k routed
        experts' and the shared expert's (what FLOPs and activation memory count)."""
        if not self.enabled:
            return dense_ff
        return (self.top_k + self.n_shared_experts) * self.expert_width(dense_ff)


def check_experts_split(n_experts: int, expert_shards: int) -> None:
    """The experts split evenly over the mesh's `expert` axis (a resolved size; a dense
    model, n_experts 0, has the axis as one more data axis)."""
    if n_experts and n_experts % expert_shards:
        raise ConfigError("mesh.expert", f"{expert_shards} expert shards do not divide model.moe.n_experts = "
                                         f"{n_experts} (each device along mesh.expert holds n_experts / expert)")
