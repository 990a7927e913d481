"""Typed, nested configs: plain dataclasses that live beside the code they configure.

A recipe is a function returning the root config. The command line edits it with dotted overrides
(`--set model.moe.top_k=4`), type-checked against the dataclass field types; every user error is a
`ConfigError` whose message is one line naming the key. A config's `validate()` (optional, per class)
checks combinations; `validate_tree` calls every one of them, parents after children.

Configs serialize to JSON with a `_type` tag per dataclass ("module:QualName"), so a checkpoint's saved
config rebuilds the exact classes (including model configs the core does not import) with `from_dict`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-caused configuration error; str(e) is a single line naming the key and the fix."""


def config_class(cls: type[T]) -> type[T]:
    """Decorator for config classes: a keyword-only dataclass (so field order never matters)."""
    return dataclasses.dataclass(kw_only=True)(cls)


def is_config(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_type(name: str) -> type:
    module, _, qual = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Any) -> Any:
    """Config tree -> JSON-ready dict (with `_type` tags)."""
    if is_config(cfg):
        out = {"_type": _type_name(type(cfg))}
        for f in dataclasses.fields(cfg):
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(d: Any) -> Any:
    """Inverse of `to_dict`."""
    if isinstance(d, dict) and "_type" in d:
        cls = _resolve_type(d["_type"])
        hints = typing.get_type_hints(cls)
        kwargs = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k == "_type":
                continue
            if k not in names:
                raise ConfigError(f"saved config has unknown key {k!r} for {cls.__qualname__} (written by another version?)")
            kwargs[k] = _coerce(from_dict(v), hints.get(k, Any), k)
        return cls(**kwargs)
    if isinstance(d, list):
        return [from_dict(v) for v in d]
    if isinstance(d, dict):
        return {k: from_dict(v) for k, v in d.items()}
    return d


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_json(text: str) -> Any:
    return from_dict(json.loads(text))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts a value (str from the command line, or a JSON value) to the annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot interpret {value!r} as {_tp_str(tp)}")
    if origin is typing.Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("[") or s.startswith("("):
                s = s[1:-1]
            items = [p.strip() for p in s.split(",") if p.strip()] if s else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            elem = args[0]
        elif origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(items)}")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args))
        out = [_coerce(v, elem, key) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: expected a JSON object, got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a dict, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if is_config(value):
            return value
        raise ConfigError(f"{key}: is a config section; set its fields ({key}.<field>=...) instead")
    return value


def _tp_str(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _field_names(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def set_value(cfg: Any, dotted: str, raw: Any) -> None:
    """Sets `cfg.<dotted>` to `raw`, converted to the field's declared type (in place)."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not is_config(node) or part not in _field_names(node):
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(
                f"unknown config key {dotted!r}: {where} has no section {part!r} "
                f"(known: {', '.join(_field_names(node)) if is_config(node) else 'none'}); see --print-config"
            )
        node = getattr(node, part)
    last = parts[-1]
    if not is_config(node) or last not in _field_names(node):
        where = ".".join(parts[:-1]) or "<root>"
        known = ", ".join(_field_names(node)) if is_config(node) else "none"
        raise ConfigError(f"unknown config key {dotted!r}: {where} has no field {last!r} (known: {known}); see --print-config")
    hints = typing.get_type_hints(type(node))
    setattr(node, last, _coerce(raw, hints.get(last, Any), dotted))


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Applies `key=value` strings (in order) to a copy of cfg and validates the result."""
    import copy

    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, _, value = item.partition("=")
        set_value(cfg, key.strip(), value.strip())
    validate_tree(cfg)
    return cfg


def validate_tree(cfg: Any, prefix: str = "") -> None:
    """Calls `validate()` on every config in the tree (children first); re-raises with the key path."""
    if not is_config(cfg):
        return
    for f in dataclasses.fields(cfg):
        validate_tree(getattr(cfg, f.name), f"{prefix}{f.name}.")
    fn = getattr(cfg, "validate", None)
    if callable(fn):
        try:
            fn()
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if not prefix or msg.startswith(prefix) else f"{prefix}{msg}") from None


def require(cond: bool, key: str, message: str) -> None:
    """`validate()` helper: raise ConfigError('<key>: <message>') unless cond."""
    if not cond:
        raise ConfigError(f"{key}: {message}")
