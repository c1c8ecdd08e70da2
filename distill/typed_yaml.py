"""YAML mappings read into typed dataclasses, every mistake one line naming file and key path.

Used for run configs (`distill.config`) and cluster profiles (`jobs.cluster`): values are checked
against the dataclasses' type hints, converting only where it is lossless (int -> float, and a
float spelling that YAML 1.1 reads as a string, such as `1e-3`, -> float).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.errors import ConfigError


def _type_name(tp: Any) -> str:
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


# A decimal number with an optional exponent. PyYAML follows YAML 1.1, whose floats need a dot
# and a signed exponent, so `1e-3` and `5E5` arrive as strings; float() reads them exactly as
# YAML 1.2 (and every other tool) would.
FLOAT_SPELLING = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check one value against a type hint, converting only where it is lossless (int -> float,
    a float spelling such as '1e-3' -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {k: _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_SPELLING.fullmatch(value):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_mapping(cls: type, raw: Any, where: str) -> Any:
    """A `cls` dataclass from a YAML mapping: unknown keys, wrong types and missing required
    keys are one ConfigError each, naming `where` and the key path."""
    prefix = f"{where}." if not where.endswith(": ") else where
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip(': ')}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key missing")
    return cls(**kwargs)


def set_path(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Put `value` at the dotted key path of `raw`, replacing what was there (a whole mapping
    when the path names one)."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def override_label(item: str, flag: str = "--set") -> str:
    """How errors name one override: `--set train.lr=fast`, on one line."""
    return f"{flag} {printable(item)}"


def parse_overrides(items: list[str], flag: str = "--set", schema: type | None = None) -> list[tuple[str, Any]]:
    """Turn `key.path=value` strings (values in YAML syntax) into pairs. With `schema` (a
    dataclass) a key path that names none of its fields, or a value of the wrong type, is
    refused here, so the error names the override rather than the config file it would be
    applied to."""
    pairs = []
    for item in items:
        shown = override_label(item, flag)
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{shown}: expected key.path=value")
        key = key.strip()
        tp = check_key_path(schema, key, shown) if schema is not None else Any
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            # A bad YAML tag (`!!int x`) fails in the constructor with a plain Python error.
            why = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
            raise ConfigError(f"{shown}: not valid YAML ({why.strip().splitlines()[0]})") from None
        _convert(value, tp, f"{shown}: {printable(key)}")
        pairs.append((key, value))
    return pairs


def check_key_path(schema: type, dotted: str, where: str) -> Any:
    """The type hint of the value at a dotted key path of the `schema` dataclass; a path that
    names no field is refused (a mapping-typed field such as `prompt.chat_template_kwargs` takes
    any key below it)."""
    keys = dotted.split(".")
    tp: Any = schema
    for depth, key in enumerate(keys):
        path = printable(".".join(keys[: depth + 1]))
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            fields = [f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")]
            if key not in fields:
                raise ConfigError(f"{where}: {path}: unknown key (expected one of: {', '.join(fields)})")
            tp = typing.get_type_hints(tp)[key]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif tp is not Any:
            raise ConfigError(f"{where}: {printable('.'.join(keys[:depth]))} is not a mapping, "
                              f"so it has no key {key!r}")
    return tp


def printable(text: str) -> str:
    """`text` as it is when printable, else quoted with escapes: an error stays one line."""
    return text if text.isprintable() else repr(text)


def read_yaml_mapping(path: Path, what: str = "config file", hint: str = "") -> dict:
    """The top-level mapping of a YAML file; every failure is one ConfigError naming file:line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found{hint}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{place}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


# -- shapes of values that end up in file names, shell lines and sbatch scripts ----------------

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SBATCH_TOKEN = re.compile(r"^[A-Za-z0-9._:,+=@/%-]+$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, where: str) -> None:
    """A run or stage name: a directory name and part of every job's name, so letters, digits
    and `-_.` only (at most 64, not starting with `.` or `-`)."""
    if not PLAIN_NAME.match(value):
        raise ConfigError(f"{where}: {value!r} is not a plain name (letters, digits, '-', '_', '.'; at most 64; "
                          "starting with a letter or digit)")


def check_sbatch_token(value: str, where: str) -> None:
    """A value that becomes one `#SBATCH --key=value` (partition, account, QOS, gres, memory):
    one token, no blanks, quotes, `$`, or control characters."""
    if not SBATCH_TOKEN.match(value):
        raise ConfigError(f"{where}: {value!r} is not a plain sbatch value (letters, digits and ._:,+=@/%- only)")


def check_one_line(value: str, where: str) -> None:
    """A path or a shell line: anything printable, but never a newline or another control
    character (each would start a new line of a job script)."""
    if CONTROL.search(value):
        raise ConfigError(f"{where}: contains a control character ({CONTROL.search(value).group(0)!r}); "
                          "one printable line is allowed")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `low`, or argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse
