"""Typed-config plumbing shared by every stage: a strict base model, YAML loading with errors that
name the field and what is allowed, dotted overrides, and config hashing.

The run-config itself (one model per stage) is `kubellm.runconfig.RunConfig`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import stable_hash

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment,
    a float must be finite (inf/nan are refused: JSON cannot carry them to the workers), and each
    field's docstring (`use_attribute_docstrings`) is its documentation."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, frozen=False,
        allow_inf_nan=False,
    )

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def _describe(err: dict[str, Any], prefix: str) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
    kind = err.get("type", "")
    msg = err.get("msg", "")
    if kind == "extra_forbidden":
        return f"{field}: unknown key (not a field of this section; check the spelling)"
    got = err.get("input")
    got_s = repr(got)
    if len(got_s) > 80:
        got_s = got_s[:77] + "..."
    return f"{field}: {msg} (got {got_s})"


def format_validation_error(e: ValidationError, source: str, prefix: str = "") -> str:
    lines = [f"{source}: invalid configuration"]
    lines += [f"  - {_describe(err, prefix)}" for err in e.errors()]  # type: ignore[arg-type]
    return "\n".join(lines)


def validate(model: type[M], data: Any, source: str = "<config>", prefix: str = "") -> M:
    """`model.model_validate(data)` with a ConfigError naming each bad field instead of a traceback."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, prefix)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, source: str = "<yaml>") -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# YAML 1.2 core-schema numbers; PyYAML resolves YAML 1.1, where `010` is 8 and `1:30` is 90
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*|0x[0-9a-fA-F]+|0o[0-7]+|0b[01]+)")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


def parse_override_value(raw: str) -> Any:
    """An override's value as YAML (`3`, `true`, `null`, `[1, 2]`, `{a: 1}`, `text`), except where YAML
    would not keep the text a user typed: what YAML cannot parse (`*.jsonl`, `@x`), a number or bool
    YAML 1.1 reads otherwise (`010` is not 8, `1:30` is not 90, `off` is not false) and a ` #` (not a
    comment here) stay the text."""
    if raw == "":
        return ""
    text = raw.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if " #" in raw and text[:1] not in "\"'":  # a quoted value keeps its '#' and loses its quotes
        return raw
    if isinstance(value, bool):  # before int: bool is one; YAML 1.1's yes/no/on/off stay text
        return value if text.lower() in ("true", "false") else raw
    if isinstance(value, int) and not _INT.fullmatch(text):
        return raw
    if isinstance(value, float) and not _FLOAT.fullmatch(text):
        return raw
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (`parse_override_value`: `3`, `true`, `[1,2]`, `text`)."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = parse_override_value(raw)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
            node[part] = dict(nxt)
            node = node[part]
        node[parts[-1]] = value
    return out


def to_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
