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
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the config file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    return parse_yaml(text, str(p))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping (it kept the last silently: a
    `pretrain:` section written twice lost the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: SafeLoader merges it below, and a key written here overrides it
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found an unhashable key",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_YAML11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp")


class _Yaml12Loader(_UniqueKeyLoader):
    """The YAML 1.2 core schema's plain scalars, at every depth: `true`/`false` only (`off`, `no` stay
    text), decimal/0x/0o/0b integers (`010` stays text, not 8; `1:30` stays text, not 90), decimal
    floats, and no timestamps (`2024-06-01` stays text, not a date)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*|0x[0-9a-fA-F]+|0o[0-7]+|0b[01]+)$"),
    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # a point or an exponent: a bare `010` is neither a float nor (leading zero) an int, so it stays text
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str = "<yaml>") -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def merge_config(model_cls: Any, base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged onto `base` along `model_cls`'s fields: a config model merges key by key, and so does
    a plain mapping (`model.overrides`, `evaluate.headline`); a mapping *of config models*
    (`evaluate.gate.rules`: task → rule) and anything else (a number, a list) is replaced whole, so an
    override can drop rules. A run-config file over a preset and `--param <stage>_config` over the
    compiled section merge alike."""
    import typing

    from pydantic import BaseModel

    def is_model(t: Any) -> bool:
        return isinstance(t, type) and issubclass(t, BaseModel)

    out = dict(base)
    fields = getattr(model_cls, "model_fields", {})
    for key, value in over.items():
        sub = getattr(fields.get(key), "annotation", None)
        if not (isinstance(value, dict) and isinstance(out.get(key), dict)):
            out[key] = value
        elif is_model(sub):
            out[key] = merge_config(sub, out[key], value)
        elif typing.get_origin(sub) is dict and is_model((typing.get_args(sub) or (None, None))[1]):
            out[key] = value  # whole entries (rules): the override's set is the set
        else:
            out[key] = deep_merge(out[key], value)
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` onto `base`, mappings merged key by key at every depth."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override_value(raw: str) -> Any:
    """An override's value as YAML (`3`, `true`, `null`, `[1, 2]`, `{a: 1}`, `text`) with the YAML 1.2 core
    schema at every depth (`_Yaml12Loader`: `010`, `1:30`, `off`, `2024-06-01` stay the text typed, in a
    list or mapping too), except that what YAML cannot parse (`*.jsonl`, `@x`) and a ` #` (not a comment
    here) stay the text."""
    if raw == "":
        return ""
    text = raw.strip()
    try:
        value = yaml.load(raw, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return raw
    if " #" in raw and text[:1] not in "\"'":  # a quoted value keeps its '#' and loses its quotes
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
