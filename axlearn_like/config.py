"""Typed, nested configs: plain dataclasses that live beside the code they configure.

A recipe is a function returning the root config. The command line edits it with dotted overrides
(`--set trainer.steps=200`), type-checked against the dataclass field types; every user error is a
`ConfigError` whose message is one line naming the key. A config's `validate()` (optional, per class)
checks combinations; `validate_tree` calls every one of them, parents after children, entries of tuple
fields included.

Tuple fields of configs (e.g. a decoder's `layer_pattern`) are addressed by entry: `x.layer_pattern.3.w1`
(index), `x.layer_pattern.simplicial.w1` (every entry whose class declares `kind = "simplicial"`) or
`x.layer_pattern.*.num_heads` (every entry having that field). A whole tuple is set from a comma list of
kind names present in it (each a copy of the first such entry) or `module:Class` names (defaults):
`x.ffn_pattern=mlp,moe,moe`.

Configs serialize to JSON with a `_type` tag per dataclass ("module:QualName"), so a checkpoint's saved
config rebuilds the exact classes (including model configs the core does not import) with `from_dict`.
A class may define a classmethod `migrate_dict(d) -> d` rewriting the dict an older version saved
(raw JSON values, before its fields are parsed), so old run directories keep loading.
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
        migrate = getattr(cls, "migrate_dict", None)
        if callable(migrate):
            d = migrate(dict(d))
        hints = typing.get_type_hints(cls)
        kwargs = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k == "_type":
                continue
            if k not in names:
                raise ConfigError(
                    f"saved config has unknown key {k!r} for {cls.__qualname__} (written by another version?)")
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
            if not isinstance(value, tp):
                raise ConfigError(f"{key}: expected a {tp.__qualname__}, got a {type(value).__qualname__}")
            return value
        raise ConfigError(f"{key}: is a config section; set its fields ({key}.<field>=...) instead")
    return value


def _tp_str(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _field_names(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _kind(entry: Any) -> str | None:
    return getattr(type(entry), "kind", None)


def _select(seq: Any, part: str, parts: list[str], i: int, dotted: str) -> list[Any]:
    """The entries of a tuple field that `part` (an index, a kind name or "*") selects."""
    where = ".".join(parts[:i])
    kinds = ", ".join(sorted({k for k in map(_kind, seq) if k})) or "none"
    if i == len(parts) - 1:
        raise ConfigError(
            f"{dotted}: is a pattern entry; set its fields ({dotted}.<field>=...) or the whole tuple "
            f"({where}=<kind>,<kind>,...)"
        )
    if part.isdigit():
        if int(part) >= len(seq):
            raise ConfigError(f"unknown config key {dotted!r}: {where} has {len(seq)} entries (index {part})")
        return [seq[int(part)]]
    if part == "*":
        field = parts[i + 1]
        found = [e for e in seq if is_config(e) and field in _field_names(e)]
        if not found:
            raise ConfigError(
                f"unknown config key {dotted!r}: no entry of {where} has a field {field!r} (kinds: {kinds})"
            )
        return found
    found = [e for e in seq if _kind(e) == part]
    if not found:
        raise ConfigError(
            f"unknown config key {dotted!r}: {where} has no entry of kind {part!r} (kinds: {kinds}); "
            f"select entries by index, kind or *"
        )
    return found


def _coerce_tuple_of_configs(current: Any, raw: Any, elem: type, key: str) -> Any:
    """A comma list of kind names (copies of the first such entry in `current`) or module:Class names."""
    import copy

    items = _coerce(raw, tuple[str, ...], key)
    if not items:
        raise ConfigError(f"{key}: needs at least one entry")
    present = {}
    for e in current or ():
        present.setdefault(_kind(e), e)
    out = []
    for name in items:
        if ":" in name:
            try:
                cls = _resolve_type(name)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{key}: cannot import {name!r} ({e})") from None
            if not (isinstance(cls, type) and issubclass(cls, elem)):
                raise ConfigError(f"{key}: {name} is not a {elem.__qualname__}")
            out.append(cls())
        elif name in present:
            out.append(copy.deepcopy(present[name]))
        else:
            raise ConfigError(
                f"{key}: no {name!r} entry to copy (present: {', '.join(k for k in present if k) or 'none'}); "
                f"name a new kind as module:Class"
            )
    return tuple(out)


def _config_elem(tp: Any) -> type | None:
    """X for a field annotated tuple[X, ...] / list[X] with X a config class, else None."""
    if typing.get_origin(tp) not in (tuple, list):
        return None
    args = typing.get_args(tp)
    if not args or (typing.get_origin(tp) is tuple and (len(args) != 2 or args[1] is not Ellipsis)):
        return None
    return args[0] if isinstance(args[0], type) and dataclasses.is_dataclass(args[0]) else None


def set_value(cfg: Any, dotted: str, raw: Any) -> None:
    """Sets `cfg.<dotted>` to `raw`, converted to the field's declared type (in place)."""
    _set_path(cfg, dotted.split("."), 0, dotted, raw)


def _set_path(node: Any, parts: list[str], i: int, dotted: str, raw: Any) -> None:
    part, last = parts[i], i == len(parts) - 1
    if isinstance(node, (tuple, list)) and i > 0:
        for entry in _select(node, part, parts, i, dotted):
            _set_path(entry, parts, i + 1, dotted, raw)
        return
    if not is_config(node) or part not in _field_names(node):
        where = ".".join(parts[:i]) or "<root>"
        known = ", ".join(_field_names(node)) if is_config(node) else "none"
        what = "field" if last else "section"
        raise ConfigError(
            f"unknown config key {dotted!r}: {where} has no {what} {part!r} (known: {known}); see --print-config"
        )
    if not last:
        _set_path(getattr(node, part), parts, i + 1, dotted, raw)
        return
    tp = typing.get_type_hints(type(node)).get(part, Any)
    elem = _config_elem(tp)
    if elem is not None and isinstance(raw, str):
        value = _coerce_tuple_of_configs(getattr(node, part), raw, elem, dotted)
    else:
        value = _coerce(raw, tp, dotted)
    setattr(node, part, value)


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
    if isinstance(cfg, (tuple, list)):
        for i, entry in enumerate(cfg):
            validate_tree(entry, f"{prefix}{i}.")
        return
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
