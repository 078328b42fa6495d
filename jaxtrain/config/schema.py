"""Typed, frozen experiment config: the schema of every section (read by config/files.py).

Schema and validation are pydantic models (`extra="forbid"`, frozen): an unknown key, a wrong
type or an impossible value is reported with its dotted key path. Rules the runtime checks
(mesh vs device count, batch and experts vs mesh) live in `sharding.py`, same `ConfigError`.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jaxtrain.config.moe import MoEConfig


class _Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` (or nan) is a config error, not a run that diverges
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)
    # In an identity section (IDENTITY_SECTIONS) every key fixes what a checkpoint holds,
    # so resuming with another value is refused, except the keys named here: a key added
    # later is an identity key unless it is listed.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()


class ModelConfig(_Section):
    vocab_size: int = Field(256, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    # Grouped-query attention: number of key/value heads (None = n_heads, i.e. plain MHA).
    n_kv_heads: int | None = Field(None, gt=0)
    # SwiGLU hidden width (None = 8/3 * d_model rounded up to a multiple of 64).
    d_ff: int | None = Field(None, gt=0)
    rope_theta: float = Field(10_000.0, gt=0)
    qk_norm: bool = False
    norm_eps: float = Field(1e-6, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # How the step is computed, not what is learned: a checkpoint resumes under any of these.
    # Compute dtype of matmuls and attention (auto: bfloat16 on GPU/TPU, float32 on CPU,
    # by the platform of the devices the step is compiled for: jaxtrain/model/execution.py);
    # parameters, optimizer state and the loss stay float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Attention kernel (jaxtrain/model/attention.py): auto is cuDNN flash attention on GPU in
    # bfloat16 where its shapes allow, the Pallas splash kernel on TPU where its tiles divide
    # data.seq_len, XLA's quadratic attention otherwise; xla / cudnn / splash force one
    # (refused in one line where the target cannot run it).
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # Rematerialisation of each block in the backward pass: none keeps all activations,
    # dots_saveable keeps matmul outputs and recomputes the rest, full only the block inputs.
    remat: Literal["none", "dots_saveable", "full"] = "none"
    # The blocks are stored stacked and run as one lax.scan (compile time flat in depth);
    # false unrolls that scan (the same code and storage, compiled once per layer).
    scan_layers: bool = True
    moe: MoEConfig = MoEConfig()  # mixture-of-experts MLPs (jaxtrain/config/moe.py); n_experts 0 = dense

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        if d_model is not None and (d_model // n_heads) % 2:
            raise ValueError(f"head_dim=d_model/n_heads={d_model // n_heads} must be even for RoPE")
        return n_heads

    @field_validator("n_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, n_kv: int | None, info: ValidationInfo) -> int | None:
        n_heads = info.data.get("n_heads")
        if n_kv is not None and n_heads is not None and n_kv > n_heads:
            raise ValueError(f"n_kv_heads={n_kv} exceeds n_heads={n_heads} (each key/value head serves "
                             f"one or more query heads)")
        if n_kv is not None and n_heads is not None and n_heads % n_kv:
            raise ValueError(f"n_kv_heads={n_kv} must divide n_heads={n_heads}")
        return n_kv

    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"dtype", "attention", "remat", "scan_layers"})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or -(-8 * self.d_model // 3 // 64) * 64


class ParametrizationConfig(_Section):
    """How init, forward multipliers, learning rates, Adam epsilon and weight decay scale
    with width and depth; `parametrization.py` turns this into the per-parameter table.

    A bare string is accepted as the name: `parametrization: mup`.
    """

    name: Literal["sp", "mup", "ntk"] = "sp"
    # Base shapes: at d_model == d0 and n_layers == L0 every parametrization equals SP.
    d0: int | None = Field(None, gt=0)  # None = model.d_model (width multiplier 1)
    L0: int | None = Field(None, gt=0)  # None = model.n_layers (depth multiplier 1)
    # Residual branches scaled by (L/L0)^-depth_alpha: 0 off, 0.5 depth-muP, 1 CompleteP.
    depth_alpha: float = Field(0.0, ge=0, le=1)
    # Attention logits scale: inv_sqrt = 1/sqrt(d_head); inv = sqrt(d_head0)/d_head (the
    # muP 1/d_head rule, anchored to SP at the base width); auto = inv under mup.
    attn_scale: Literal["auto", "inv_sqrt", "inv"] = "auto"
    # The base model's head dimension, which `inv` is anchored to. None = d0 / n_heads: the
    # head count stays fixed as width grows. Set it (e.g. 64) when width grows by adding
    # heads of a fixed size; then inv equals 1/sqrt(head_dim) at every width.
    head_dim0: int | None = Field(None, gt=0)
    init_std: float = Field(1.0, gt=0)  # sigma: hidden matrices start at sigma/sqrt(fan_in)
    embed_std: float = Field(1.0, gt=0)  # sigma_emb
    embed_multiplier: float = Field(1.0, gt=0)  # alpha_emb
    output_multiplier: float = Field(1.0, gt=0)  # alpha_out
    readout_zero_init: bool = False
    # Hidden-matrix weight decay lambda * (d/d0)^gamma under mup (0.5: Robust Layerwise
    # Scaling Rules by Proper Weight Decay Tuning; 1: the `mup` package). Measured over 4x
    # width: lambda_opt drifts +0.38 grid steps at 0.5, -0.62 at 1 (docs/weight_decay_transfer.md).
    gamma: float = 0.5
    # Decay embedding, readout and norm gains too (with the unscaled lambda).
    decay_vector_like: bool = False

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw


class OptimizerConfig(_Section):
    lr: float = Field(3e-3, gt=0)  # peak learning rate
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_norm: float = Field(1.0, ge=0)  # global-norm clipping; 0 disables
    # coupled: decay multiplied by the parameter's current learning rate (optax adamw);
    # independent: by lr(t)/lr_peak times the role's LR multiplier (not by the peak), so lambda
    # is a per-step rate at the base shape that a learning-rate sweep leaves alone (Wortsman
    # et al. 2023) and parametrization.gamma scales the coupled coefficient in both modes.
    weight_decay_mode: Literal["coupled", "independent"] = "coupled"
    # muon: hidden matrices by Muon (jaxtrain/optim/muon.py), the other roles by AdamW as above.
    name: Literal["adamw", "muon"] = "adamw"
    # The orthogonalized update's multiplier: spectral = sqrt(fan_out/fan_in), rms_match =
    # 0.2 sqrt(max(fan_in, fan_out)) (AdamW's update RMS and learning rate), none = 1.
    muon_scale: Literal["spectral", "rms_match", "none"] = "spectral"
    muon_momentum: float = Field(0.95, ge=0, lt=1)  # Nesterov momentum of the Muon roles
    muon_ns_steps: int = Field(5, ge=1)  # Newton-Schulz iterations
    muon_ns_dtype: Literal["float32", "bfloat16"] = "float32"  # precision of the iterations
    adam_lr: float | None = Field(None, gt=0)  # Muon: peak LR of the AdamW roles; None = lr
    # name fixes the state a checkpoint holds, muon_scale the table; the rest may change on resume
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "adam_lr", "weight_decay_mode",
        "muon_momentum", "muon_ns_steps", "muon_ns_dtype"})

    @model_validator(mode="after")
    def _muon_only(self) -> "OptimizerConfig":
        if self.name != "muon" and self.adam_lr is not None:
            raise ValueError("adam_lr is the AdamW roles' learning rate next to Muon; with name adamw set lr")
        return self


class ScheduleConfig(_Section):
    """The learning-rate schedule (jaxtrain/optim/schedules.py). Lengths in steps, tokens or as a
    fraction of the run: give at most one of each group."""

    name: Literal["constant", "linear", "cosine", "wsd", "power"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_tokens: int | None = Field(None, ge=0)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)
    # WSD and Power: the final decay, its length (default: 0.2 of the run) and shape.
    decay_fraction: float = Field(0.2, gt=0, le=1)
    decay_steps: int | None = Field(None, gt=0)
    decay_tokens: int | None = Field(None, gt=0)
    decay_shape: Literal["linear", "cosine", "1-sqrt", "exponential"] = "linear"
    # Learning rate at the end of the decay, as a fraction of the peak (Power: of the
    # learning rate where the decay starts).
    final_lr_fraction: float = Field(0.1, ge=0, le=1)
    # Power: lr = min(optimizer.lr, batch_size * power_a * tokens_seen ** power_b); 4: the paper's,
    # 0.125: measured on the muP proxy configs/mup_sweep.yaml (docs/schedule_transfer.md).
    power_a: float = Field(4.0, gt=0)
    power_b: float = Field(-0.51, lt=0)

    @model_validator(mode="after")
    def _one_length_each(self) -> "ScheduleConfig":
        for group, given in (("warmup", {"warmup_steps": self.warmup_steps or None, "warmup_tokens": self.warmup_tokens,
                                         "warmup_fraction": self.warmup_fraction}),
                             ("decay", {"decay_steps": self.decay_steps, "decay_tokens": self.decay_tokens})):
            named = [k for k, v in given.items() if v is not None]
            if len(named) > 1:
                raise ValueError(f"give the {group} length once, not as {' and '.join(named)}")
        return self


class SourceConfig(_Section):
    """One prepared dataset (`jaxtrain data prepare`) of a mixture."""

    path: str
    weight: float = Field(1.0, ge=0)
    name: str | None = None  # None: the directory's name; used in val_loss/<name> and phases


class PhaseConfig(_Section):
    """From `start_step` (or `start_fraction` of train.steps) on, mix with these weights
    (source name -> weight; sources not named get 0)."""

    start_step: int | None = Field(None, gt=0)
    start_fraction: float | None = Field(None, gt=0, lt=1)
    weights: dict[str, float]

    @model_validator(mode="after")
    def _one_start(self) -> "PhaseConfig":
        if (self.start_step is None) == (self.start_fraction is None):
            raise ValueError("give a phase exactly one of start_step and start_fraction")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError("phase weights must be >= 0 and not all 0")
        return self


class DataConfig(_Section):
    # Globs of text files, byte tokens, read into memory at start; "{stdlib}" is the
    # Python standard-library directory. site-packages is always excluded. Used when
    # `sources` is empty.
    paths: tuple[str, ...] = ("{stdlib}/**/*.py",)
    # Prepared datasets (`jaxtrain data prepare`), mixed by weight; replace `paths`.
    sources: tuple[SourceConfig, ...] = ()
    phases: tuple[PhaseConfig, ...] = ()  # mixture weights per phase of the run
    # Attention and positions restart at every document inside a window (segment ids).
    packing: bool = False
    # Warn when a source is read for more than this many epochs (repeating data beyond
    # ~4 epochs stops helping: Muennighoff et al. 2023, "Scaling Data-Constrained LMs").
    max_epochs: float = Field(4.0, gt=0)
    seq_len: int = Field(256, gt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # for `paths`; prepared data has its own split
    val_batches: int = Field(8, gt=0)
    seed: int = 0
    read_threads: int = Field(2, ge=0)
    # how much is read or checked, not which tokens train: these may change on resume
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"max_epochs", "val_batches", "read_threads"})

    @field_validator("paths")
    @classmethod
    def _some_paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        if not paths:
            raise ValueError("at least one path or glob is required")
        return paths

    @model_validator(mode="after")
    def _mixture(self) -> "DataConfig":
        names = self.source_names()
        if len(set(names)) != len(names):
            raise ValueError(f"source names must differ (got {names}); set data.sources[i].name")
        if self.sources and not any(s.weight > 0 for s in self.sources):
            raise ValueError("at least one source needs a weight > 0")
        if self.phases and not self.sources:
            raise ValueError("data.phases need data.sources")
        for phase in self.phases:
            unknown = sorted(set(phase.weights) - set(names))
            if unknown:
                raise ValueError(f"phase weights name unknown sources {unknown} (sources: {names})")
        return self

    def source_names(self) -> list[str]:
        return [s.name or os.path.basename(os.path.normpath(s.path)) for s in self.sources]


class MeshConfig(_Section):
    """Device mesh axis sizes; exactly one may be -1 (fill with the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1  # splits model.moe's experts, a data axis for the rest (model/sharding.py)
    tensor: int = 1

    @field_validator("data", "fsdp", "expert", "tensor")
    @classmethod
    def _positive_or_fill(cls, size: int) -> int:
        if size == 0 or size < -1:
            raise ValueError(f"axis size must be positive or -1 (fill), got {size}")
        return size


class CheckpointConfig(_Section):
    every_steps: int = Field(100, gt=0)
    keep: int = Field(3, gt=0)
    async_save: bool = True


class InitFromConfig(_Section):
    """Continued pretraining (jaxtrain/run/rewarm.py): a new run starts from another run's
    checkpoint, or from a Hugging Face model directory (jaxtrain/huggingface/), instead of
    a random init; its own schedule and data apply from step 0."""

    workdir: str | None = None  # a jaxtrain workdir
    huggingface: str | None = None  # a Llama / Qwen3 directory (config.json + safetensors)
    step: int | None = Field(None, ge=0)  # None: the newest checkpoint
    optimizer: bool = False  # also load the Adam moments (otherwise they start at zero)

    @model_validator(mode="after")
    def _one_source(self) -> "InitFromConfig":
        if (self.workdir is None) == (self.huggingface is None):
            raise ValueError("set exactly one of workdir (a jaxtrain run) and huggingface (a model directory)")
        if self.huggingface is not None and (self.step is not None or self.optimizer):
            raise ValueError("step and optimizer apply to init_from.workdir only (a Hugging Face "
                             "directory holds weights, no optimizer state)")
        return self


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0)  # global, in sequences
    seed: int = 0
    z_loss: float = Field(0.0, ge=0)  # coefficient of mean(logsumexp(logits)^2)
    # Gradient accumulation: each step averages the gradients of this many equal slices of
    # the batch, computed one after another (activation memory of one slice).
    microbatches: int = Field(1, gt=0)
    # The dtype the weight gradients are summed over the batch devices in (FSDP's
    # reduce-scatter, data parallel's all-reduce), whatever the compute dtype: float32 sums
    # bf16 per-device gradients without rounding each partial sum (torchtitan's reduce_dtype);
    # bfloat16 halves the bytes. How the step is computed, not what is learned: a run
    # resumes under either (train is no identity section, jaxtrain/config/resume.py).
    grad_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    # After SIGTERM/SIGINT: finish the step, checkpoint it, exit; if that takes longer than
    # this, exit anyway (status 124) and resume from the newest complete checkpoint.
    grace_period_sec: float = Field(60.0, gt=0)
    # A step with a non-finite loss or gradient: `halt` stops before checkpointing it
    # (exit 3), `skip` drops its update and counts it (jaxtrain/run/nonfinite.py).
    on_nonfinite: Literal["halt", "skip"] = "halt"
    # Start from another run's checkpoint (rewarm / continued pretraining); used only while
    # this workdir has no checkpoint of its own.
    init_from: InitFromConfig | None = None
    # Also send every metrics.jsonl row to this Weights & Biases project (needs `wandb`
    # installed and logged in, or WANDB_MODE=offline); None = never touch W&B.
    wandb_project: str | None = None


class DiagnosticsConfig(_Section):
    """Expensive measurements every `every_steps` steps (0 = never), logged with that step."""

    every_steps: int = Field(0, ge=0)
    # Top singular value of every weight matrix (fan-in x fan-out), by power iteration.
    singular_values: bool = True
    # Top Hessian eigenvalue of the training loss on the step's batch, by power iteration
    # on Hessian-vector products (one extra forward+backward pair per iteration).
    sharpness: bool = False
    power_iterations: int = Field(20, gt=0)
    # Stability telemetry (jaxtrain/run/telemetry.py: max attention logit per layer, log Z,
    # per-role grad norm, update/param RMS, param norm) every this many steps (0 = never).
    telemetry_every: int = Field(0, ge=0)


class TaskConfig(_Section):
    """One evaluation task (jaxtrain/run/tasks.py, docs/evaluation.md), read from local files:
    `bits_per_byte` scores held-out text (a prepared dataset's validation split, a jsonl
    file's `text_field`, or text files / globs, one document each); `multiple_choice` a
    jsonl of {"context", "choices", "gold"} questions, as lm-evaluation-harness scores them."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # logged as eval/<name>/<metric>
    kind: Literal["bits_per_byte", "multiple_choice"]
    path: str
    limit: int | None = Field(None, gt=0)  # the first `limit` documents / questions (None: all)
    text_field: str = "text"  # bits_per_byte from a jsonl file: the field holding each document
    target_delimiter: str = " "  # multiple_choice: put between the context and each choice


class EvalConfig(_Section):
    """Evaluation tasks scored during training (and by `jaxtrain eval --tasks`)."""

    every: int | None = Field(None, gt=0)  # None: train.eval_every
    batch_size: int | None = Field(None, gt=0)  # rows of seq_len tokens per scoring call; None: train.batch_size
    tasks: tuple[TaskConfig, ...] = ()

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, tasks: tuple[TaskConfig, ...]) -> tuple[TaskConfig, ...]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ (got {names})")
        return tasks


class Config(_Section):
    model: ModelConfig = ModelConfig()
    parametrization: ParametrizationConfig = ParametrizationConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
