"""The configuration reference, generated from the schema: `python -m distill config-reference`
writes docs/config-reference.md, and a test fails when the committed page and the schema differ.

Each key's type and default come from the dataclasses (`distill.config`, `distill.train_config`),
its allowed values from `config.RANGES`, and its help from the schema's own words: the comment
lines right above the field, or for a section the class docstring. So the help is written once,
beside the field it describes, and this page, `--set` errors and the code cannot disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Literal, Union

from distill.config import RANGES, RunConfig

HEADER = """# Configuration reference

Generated from the schema by `python -m distill config-reference` (do not edit: change the
comment above the field in `distill/config.py` or `distill/train_config.py`, then run
`make config-reference`). Every key can be set in the YAML file or with `--set key.path=value`;
[configuration](configuration.md) explains the sections and how configs are checked.
"""


def field_help(cls: type) -> dict[str, str]:
    """The comment lines right above each field of a dataclass, by field name."""
    helps, comment = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0]
        if comment and name.isidentifier() and ":" in text:
            helps[name] = " ".join(comment)
        comment = []
    return helps


def type_text(tp: Any) -> str:
    """A field's type as a config file spells it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is dataclasses.MISSING:
        return "required"
    else:
        value = f.default
    if value is None:
        return "null"
    return "`" + (repr(value) if isinstance(value, str) and ("\n" in value or value == "") else str(value)) + "`"


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed, help) for every leaf key under `cls`; sections recurse."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    ranges = dict(RANGES)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = " ".join((tp.__doc__ or "").split())
            doc = "" if doc.startswith(f"{tp.__name__}(") else doc  # the signature dataclass puts there
            out.append((key, "section", "", "", helps.get(f.name, doc)))
            out += rows(tp, f"{key}.")
            continue
        allowed = ranges[key].describe(tp is float or float in typing.get_args(tp)) if key in ranges else ""
        out.append((key, type_text(tp), default_text(f), allowed, helps.get(f.name, "")))
    return out


def reference() -> str:
    """The whole page: the top-level keys, then one table per section."""
    table = ["| key | type | default | allowed | help |", "|---|---|---|---|---|"]
    top, sections = ["## Top level", "", *table], []
    for key, tp, default, allowed, text in rows(RunConfig):
        if tp == "section":
            sections += ["", f"## `{key}`", "", *([text, ""] if text else []), *table]
            continue
        cells = [f"`{key}`", tp, default.replace("|", "\\|").replace("\n", "\\n"), allowed, text.replace("|", "\\|")]
        (top if "." not in key else sections).append("| " + " | ".join(cells) + " |")
    return "\n".join([HEADER, *top, *sections]) + "\n"
