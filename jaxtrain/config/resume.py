"""Which config keys a checkpoint fixes: the identity rule of resuming.

The identity sections' keys (IDENTITY_SECTIONS: model, parametrization, optimizer, data)
fix what a checkpoint holds, except the keys each section lists in its `RESUMABLE`
(jaxtrain/config/schema.py), which change only how a step is computed or read; every
other section (steps, schedule, logging, mesh, checkpointing) may change on resume. A run
started from another run's parameters (train.init_from) shares INIT_FROM_SECTIONS with it.
Used by run/preflight.py (resume), run/rewarm.py (init_from) and tools/cooldown.py.
"""

from __future__ import annotations

from typing import Any

from jaxtrain.config.schema import DataConfig, ModelConfig, OptimizerConfig, ParametrizationConfig, _Section


# The sections whose keys fix what a checkpoint holds (minus each section's RESUMABLE);
# everything else (steps, schedule, logging, mesh, checkpointing) may change on resume.
IDENTITY_SECTIONS: dict[str, type[_Section]] = {"model": ModelConfig, "parametrization": ParametrizationConfig,
                                                 "optimizer": OptimizerConfig, "data": DataConfig}
# What a run started from another run's parameters (train.init_from) must share with it:
# the parameters' shapes and meaning. Its data and optimizer may be new.
INIT_FROM_SECTIONS = ("model", "parametrization")


def identity_difference(new: dict[str, Any], old: dict[str, Any],
                        sections: tuple[str, ...] = tuple(IDENTITY_SECTIONS)) -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first identity key on which two configs in
    `to_dict()` form differ, or None. A key the old config lacks (written before the key
    existed) had the key's default value; a nested section (model.moe) is compared key by
    key the same way, so a key added to it later does not refuse the runs saved before."""
    for section in sections:
        schema = IDENTITY_SECTIONS[section]
        defaults = schema().model_dump(mode="json")
        found = _first_difference(section, new[section], old.get(section, {}), defaults, schema.RESUMABLE)
        if found:
            return found
    return None


def _first_difference(prefix: str, new: dict[str, Any], old: dict[str, Any], defaults: dict[str, Any],
                      resumable: frozenset[str] = frozenset()) -> tuple[str, Any, Any] | None:
    for key, value in new.items():
        default = defaults.get(key, value)
        old_value = old.get(key, default)
        if key in resumable:
            continue
        if isinstance(value, dict) and isinstance(old_value, dict) and isinstance(default, dict):
            found = _first_difference(f"{prefix}.{key}", value, old_value, default)
            if found:
                return found
        elif old_value != value:
            return f"{prefix}.{key}", old_value, value
    return None
