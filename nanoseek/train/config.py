"""Configs as nested dataclasses: TOML in, TOML out, `--set section.key=value` overrides.

The pretraining config (`nanoseek.pretrain.config.RunConfig`) and the post-training one
(`nanoseek.posttrain.config.PostConfig`) are both a root dataclass of sections, each section a
dataclass whose fields carry a one-line docstring (the string under the field). This module holds
what they share: typed loading with errors that name the key and list the valid ones, `--set`
parsing, TOML writing that reads back to an equal config, and the key listing for `--help`.
TOML has no null: the string "null" stands for None where a field allows it (`null`).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import fields
from functools import cache
from typing import Any

import tomllib


def null(value):
    """TOML has no null: the string "null" (or "none") stands for None in model overrides."""
    if isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    if isinstance(value, dict):
        return {k: null(v) for k, v in value.items()}
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass (attribute docstrings, read from source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def sections(root: type) -> dict[str, type]:
    """{section name: section dataclass} of a root config class."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in fields(root)}


def type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def coerce(value, tp, name: str):
    """`value` as type `tp` (int, float, bool, str, list[X], dict), or a ValueError naming `name`."""
    def fail():
        raise ValueError(f"{name} = {value!r} is invalid: expected {type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ValueError:
                pass
        fail()
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            fail()
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        fail()
    raise TypeError(f"unsupported config type {tp} for {name}")


def unknown_key(key: str, where: str, valid) -> ValueError:
    return ValueError(f"unknown config key {key!r} in {where}; valid keys: {', '.join(valid)}")


def update(cfg, data: dict, merged: Collection[tuple[str, str]] = (),
           checks: Mapping[tuple[str, str], Callable[[Any], None]] | None = None):
    """A copy of `cfg` updated by nested dicts (a parsed TOML file). Dict fields named in `merged` are
    updated key by key (a table adds to the default rather than replacing it); `checks` validate a
    field's value before it is set."""
    cfg = copy.deepcopy(cfg)
    secs = sections(type(cfg))
    if not isinstance(data, dict):
        raise ValueError(f"a run config must be a table of sections, got {type(data).__name__}")
    for name, values in data.items():
        if name not in secs:
            raise unknown_key(name, "the run config (sections)", secs)
        if not isinstance(values, dict):
            raise ValueError(f"[{name}] must be a table of keys, got {values!r}")
        section = getattr(cfg, name)
        hints = typing.get_type_hints(secs[name])
        valid = [f.name for f in fields(section)]
        for key, value in values.items():
            if key not in valid:
                raise unknown_key(f"{name}.{key}", f"[{name}]", valid)
            value = coerce(value, hints[key], f"{name}.{key}")
            if checks and (name, key) in checks:
                checks[name, key](value)
            if (name, key) in merged:
                value = {**getattr(section, key), **value}
            setattr(section, key, value)
    return cfg


def assignments(items: list[str]) -> dict:
    """`--set` strings as nested dicts: `section.key=value`, or `section.dictfield.KEY=value` for one
    entry of a dict field; values are TOML literals or bare strings (`parse_value`)."""
    data: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r} is invalid: expected section.key=value, e.g. optim.lr=3e-4")
        value = parse_value(text.strip())
        parts = key.split(".")
        if len(parts) == 3:
            data.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = value
        elif len(parts) == 2:
            data.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ValueError(f"--set {item!r} is invalid: the key must be section.key (or section.dictfield.KEY)")
    return data


def parse_value(text: str):
    """A TOML literal (3e-4, true, [1, 2], "s", {a = 1}), or the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_toml(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None


def parse_toml(text: str, where: str = "<string>") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({e})") from None


# ---------------------------------------------------------------------- writing
def toml_value(value) -> str:
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(cfg, comments: bool = True) -> str:
    """The config as TOML that reads back (`update`) to an equal config; comments are the docstrings."""
    lines: list[str] = []
    top = field_docs(type(cfg))
    for name, cls in sections(type(cfg)).items():
        section = getattr(cfg, name)
        docs = field_docs(cls)
        if lines:
            lines.append("")
        if comments:
            lines.append(f"# {inspect.getdoc(cls) or top.get(name, '')}")
        lines.append(f"[{name}]")
        nested = []
        for f in fields(section):
            value = getattr(section, f.name)
            if isinstance(value, dict):
                nested.append((f.name, value))
                continue
            if comments and f.name in docs:
                lines.append(f"# {docs[f.name]}")
            lines.append(f"{f.name} = {toml_value(value)}")
        for key, value in nested:
            lines.append("")
            if comments and key in docs:
                lines.append(f"# {docs[key]}")
            lines.append(f"[{name}.{key}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def flatten(cfg) -> dict[str, Any]:
    """{"section.key": value} (dict fields as one value)."""
    return {f"{s}.{k}": v for s, section in dataclasses.asdict(cfg).items() for k, v in section.items()}


def describe(root: type, only: Collection[str] | None = None) -> str:
    """Every key (of the sections in `only`, default all) with its type, default and docstring."""
    out = []
    defaults = root()
    for name, cls in sections(root).items():
        if only is not None and name not in only:
            continue
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        out.append(f"[{name}] {inspect.getdoc(cls) or ''}")
        for f in fields(cls):
            default = getattr(getattr(defaults, name), f.name)
            out.append(f"  {name}.{f.name} ({type_name(hints[f.name])}, default {toml_value(default)}): "
                       f"{docs.get(f.name, '')}")
    return "\n".join(out)
