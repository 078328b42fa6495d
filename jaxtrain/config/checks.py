"""Rules across config sections, checked once every section validated on its own
(`files.from_dict` calls `check_cross_sections`): the experts split over mesh.expert,
the blocks split into whole groups of model.moe.moe_every, phases start at increasing
steps, the exponential decay has a floor to decay towards, the warmup ends before the run does.

Each problem is a `ConfigError` naming the dotted key. `phase_start_steps` is also the
mixture's (jaxtrain/data/mixture.py): where each phase of data.phases begins.
"""

from __future__ import annotations

from jaxtrain.config.errors import ConfigError
from jaxtrain.config.moe import check_experts_split
from jaxtrain.config.schema import Config


def phase_start_steps(cfg: Config) -> list[int]:
    """The first step of each of data.phases."""
    return [p.start_step if p.start_step is not None else round(p.start_fraction * cfg.train.steps)
            for p in cfg.data.phases]


def check_cross_sections(cfg: Config) -> None:
    if cfg.mesh.expert != -1:  # a filled (-1) axis is checked once resolved (sharding.check_batch_splits)
        check_experts_split(cfg.model.moe.n_experts, cfg.mesh.expert)
    moe, n_layers = cfg.model.moe, cfg.model.n_layers
    if moe.enabled and n_layers % moe.moe_every:
        raise ConfigError("model.moe.moe_every", f"moe_every={moe.moe_every} must divide model.n_layers={n_layers} "
                                                 f"(the blocks repeat in groups of moe_every - 1 dense, then one MoE)")
    starts = phase_start_steps(cfg)
    if starts != sorted(set(starts)):
        raise ConfigError("data.phases", f"phases must start at increasing steps (got {starts})")
    if cfg.schedule.decay_shape == "exponential" and cfg.schedule.final_lr_fraction == 0:
        raise ConfigError("schedule.final_lr_fraction", "must be > 0 for the exponential decay shape "
                                                        "(it decays geometrically towards it)")
    s, tokens_per_step = cfg.schedule, cfg.train.batch_size * cfg.data.seq_len
    for key, warmup in (("warmup_steps", s.warmup_steps * tokens_per_step), ("warmup_tokens", s.warmup_tokens),
                        ("warmup_fraction", s.warmup_fraction and s.warmup_fraction * cfg.train.steps * tokens_per_step)):
        if warmup and warmup >= cfg.train.steps * tokens_per_step:
            raise ConfigError(f"schedule.{key}", f"{getattr(s, key)} must be shorter than the run "
                                                 f"(train.steps={cfg.train.steps} of {tokens_per_step} tokens)")
