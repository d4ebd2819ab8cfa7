"""Typed values for the config's dataclasses: check a YAML value against a field's annotation, build nested
dataclasses from mappings, merge trees and set dotted keys; every failure is a one-line ConfigError naming
the file or override, the key and the value.

Why a hand-written checker and not pydantic (installed with DeepSpeed): measured here, importing pydantic
and building the schema of Config costs ~130 ms on every CLI start (this module alone: ~35 ms), which
would make `--help` and `launch.config_check` several times slower; pydantic's strict mode also refuses a
dict for a nested dataclass, so strictness (bools are not ints) would have to be spelled per field, YAML
1.1's "1e-3" strings need a before-validator, and every pydantic error type would need translating back
into these one-line messages with their origin: more code than the ~60 lines of `_check_value` it replaces.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Union

from core.errors import UserError


class ConfigError(UserError):
    """The config file or an override is invalid; the message is one line naming the key and the value."""


def _type_name(tp) -> str:
    return {int: "int", float: "float", str: "string", bool: "bool", list: "list", dict: "mapping"}.get(tp, str(tp))


# The plain annotation types: (does the YAML value qualify?, what the message says it must be). Bools are
# not numbers here, although Python's bool subclasses int.
_TYPES = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    list: (lambda v: isinstance(v, list), "a list"),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
}


def check_value(key: str, value: Any, tp, choices, where: str) -> Any:
    """Return `value` converted to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, arg, choices, where)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number everyone means.
        try:
            value = float(value)
        except ValueError:
            pass
    accepts, must_be = _TYPES[tp]
    if not accepts(value):
        raise ConfigError(f"{where}: {key} must be {must_be}, got {value!r}")
    if tp is float:
        value = float(value)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def build(cls, values: dict, prefix: str, where: str, sources: dict | None = None):
    """Instantiate dataclass `cls` from a (possibly partial) mapping, validating every key.

    `sources` maps dotted keys set on the command line to "override KEY=VALUE" so errors name their origin.
    """
    sources = sources or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            known = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"{sources.get(prefix + str(key), where)}: unknown key {prefix}{key!s} "
                              f"(known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, values[name] if values[name] is not None else {}, f"{prefix}{name}.",
                                  sources.get(prefix + name, where), sources)
        else:
            kwargs[name] = check_value(prefix + name, values[name], tp, f.metadata.get("choices"),
                                        sources.get(prefix + name, where))
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "extra":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(tree: dict, dotted: str, value: Any, where: str, root) -> None:
    """Set tree[a][b][c] = value for "a.b.c", checking each level names a real section of dataclass `root`."""
    parts = dotted.split(".")
    node, cls = tree, root
    for i, part in enumerate(parts[:-1]):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        if part not in fields or not dataclasses.is_dataclass(hints[part]):
            if part in fields and hints[part] is dict:  # deepspeed.extra.zero_optimization.x=... into a mapping
                sub = node.setdefault(part, {})
                for p in parts[i + 1:-1]:
                    sub = sub.setdefault(p, {})
                sub[parts[-1]] = value
                return
            raise ConfigError(f"{where}: unknown key {dotted} ({'.'.join(parts[:i + 1])} is not a section)")
        cls = hints[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} must be a mapping")
    node[parts[-1]] = value
