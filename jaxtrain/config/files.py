"""The one config reader: YAML experiment files and `--set a.b=c` overrides, validated into
a `Config` (the resolved config a run recorded in its workdir is read through it by
`workdir.read_run_config`).

A problem is one line naming the file or the dotted key (`ConfigError`, `UserError`):
unreadable file, invalid YAML with its line, a key given twice, an unknown key, a value of
the wrong type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import yaml

from jaxtrain.config.checks import check_cross_sections
from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.schema import Config


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` pairs into a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "overrides must look like key.path=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), "is a value, not a section")
            node = child
        node[leaf] = value
    return raw


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config; the first problem becomes a ConfigError."""
    try:
        cfg = Config.model_validate(raw)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "value_error":
            message = str(first["ctx"]["error"])
        elif "input" in first and not isinstance(first["input"], dict):
            message = f"{message} (got {first['input']!r})"
        raise ConfigError(key, message) from None
    check_cross_sections(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML itself keeps the
    last, which silently drops the first setting)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a non-empty mapping; anything else is one line naming
    the file (unreadable, invalid YAML with its line, a key given twice, empty, a list)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {path}: invalid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if raw is None:
        raise UserError(f"{what} {path}: is empty (write at least one section, e.g. 'model: {{d_model: 256}}')")
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path}: the top level must be a mapping of sections, not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML experiment file, apply `--set` overrides, validate."""
    return from_dict(apply_overrides(read_yaml_mapping(path), list(overrides)))

