"""The words of every message, and `error_lines`, the one translator of pydantic's errors (docs/design.md, "The
config layer"): every line a user reads about a spec reads "<field path>: <what is wrong>; <how to fix>". What the
messages say of a field and what docs/spec.md says of it (sweep.config.reference) come from the functions here."""

import difflib
import math
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

YAML_WORDS = {None: "null", True: "true", False: "false"}


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, on one short line (clipped: not for paths, which are shown whole)."""
    value = python_value(value)
    text = YAML_WORDS[value] if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def listing(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 25 else ", ".join(names[:25]) + f", ... ({len(names)} in all)"


def close(word: Any, candidates) -> str:
    # cutoff 0.5 rather than difflib's 0.6, so short names such as 'l3' still get a suggestion ('l2')
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'? " if match else ""


def unknown_name(value, names, what: str) -> str:
    if not isinstance(value, str):
        return f"{show(value)} is not a {what} name; choose one of {listing(names)}"
    return f"unknown {what} {show(value)}; {close(value, names)}choose one of {listing(names)}"


def python_value(value: Any) -> Any:
    """numpy scalars (Ray Tune samples them) as the Python values they hold."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


NULL_TEXT = ("None", "none", "Null", "NULL")


def null_text(value: Any) -> str:
    return f"{show(value)} is text in YAML; write null (or leave the key out)"


def as_real(value: Any) -> float:
    """A finite number (not text, not true/false) as a float, or ValueError: for values inside a mapping or a range."""
    if isinstance(value, str):
        raise ValueError(f"{show(value)} is not a number; write a number such as 0.5")  # noqa: TRY004
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{show(value)} is not a finite number; write a number such as 0.5")
    return float(value)


def dotted(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]").removeprefix(".")


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def locate(cls: type | None, keys) -> "FieldInfo | type | None":
    """The field at keys below model cls, the model class of a section there, or None when there is no such place."""
    node: Any = cls
    for key in keys:
        field = node.model_fields.get(key) if isinstance(node, type) and isinstance(key, str) else None
        if field is None:
            return None
        node = field.annotation if is_section(field.annotation) else field
    return node


def fields(cls: type, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every setting below model cls, by path, in the order of the models."""
    for name, field in cls.model_fields.items():
        if is_section(field.annotation):
            yield from fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def kind_of(field: FieldInfo) -> Any:
    """What a field holds without its null: int, float, bool, str, a Literal, or None for a mixed or custom type."""
    kinds = [a for a in get_args(field.annotation) if a is not type(None)] \
        if get_origin(field.annotation) in (Union, types.UnionType) else [field.annotation]
    kind = kinds[0] if len(kinds) == 1 else None
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def nullable(field: FieldInfo) -> bool:
    return type(None) in get_args(field.annotation)


def choices(field: FieldInfo) -> tuple:
    """The values a `Literal` field takes (not its null); () for any other field."""
    kind = kind_of(field)
    return get_args(kind) if get_origin(kind) is Literal else ()


def numeric(field: FieldInfo) -> str | None:
    """Which ranges may sweep a field: "int" (randint), "float" (uniform, loguniform) or None (grid and choice)."""
    return {int: "int", float: "float"}.get(kind_of(field))


def value_range(field: FieldInfo) -> tuple[str, bool]:
    """A number field's range as messages and docs write it ('>= 0', '(0, 1)'), and whether it has an upper end."""
    limits = {key: getattr(m, key) for m in field.metadata for key in ("ge", "gt", "le", "lt") if hasattr(m, key)}
    lo, hi = limits.get("ge", limits.get("gt")), limits.get("le", limits.get("lt"))
    shown = (field.json_schema_extra or {}).get("bounds")
    if shown or kind_of(field) is not int:
        shown = shown or (f"{'>' if 'gt' in limits else '>='} {lo:g}" if hi is None else
                          f"{'(' if 'gt' in limits else '['}{lo:g}, {hi:g}{')' if 'lt' in limits else ']'}")
    else:
        shown = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    return shown, hi is not None


_INT, _FLOAT = ("int_type", "int_from_float", "int_parsing"), ("float_type", "float_parsing", "finite_number")
_BOUND = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_MISSING = {"name": "missing; add a sweep name such as name: my_sweep"}
# Settings that existed once: a spec that still sets one is told what replaced it, not "unknown key".
_RETIRED = {"resources.process": "removed in 0.2 (every trial runs in its own Ray worker); delete this line, and "
                                 "share a node's data between trials through Ray's object store as before (automatic)"}


def error_lines(error: ValidationError, prefix: str = "", model: type | None = None,
                leaf: str | None = None) -> tuple[list[str], list[tuple]]:
    """Our one-line messages for pydantic's errors, and the location of each (a tuple of keys). model: the model
    validated, and leaf: the path below it of the one field validated (a swept value, by schema.field_adapter)."""
    lines, locs = [], []
    for item in error.errors():
        loc, kind, value = tuple(item["loc"]), item["type"], item.get("input")
        path = ".".join(p for p in (prefix, dotted(loc)) if p)
        info = locate(model, leaf.split(".") if leaf else loc)
        info = info if isinstance(info, FieldInfo) else None
        example = info and (info.examples[0] if info.examples else info.default)
        if info is not None and nullable(info) and isinstance(value, str) and value in NULL_TEXT:
            message = null_text(value)
        elif kind == "value_error":
            message = str(item["ctx"]["error"])
        elif kind == "extra_forbidden":
            known = locate(model, loc[:-1])
            keys = list(known.model_fields) if isinstance(known, type) else []
            message = _RETIRED.get(dotted(loc)) or f"unknown key; {close(loc[-1], keys)}known keys: {listing(keys)}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            known = locate(model, loc)
            first = next(iter(known.model_fields)) if isinstance(known, type) else "key"
            message = f"{show(value)} is not a mapping; write {path}: {{{first}: ..., ...}}"
        elif kind == "missing":
            message = _MISSING.get(dotted(loc), "missing; add it")
        elif info is None or kind not in (*_INT, *_FLOAT, *_BOUND, "bool_type", "literal_error"):
            message = f"{item['msg']}; check this setting"
        elif kind in _INT:
            message = f"{show(value)} is not a whole number; write an integer such as {example}"
        elif kind in _FLOAT:
            finite = "" if isinstance(value, str) else " finite"
            message = f"{show(value)} is not a{finite} number; write a number such as 0.5"
        elif kind == "bool_type":
            message = f"{show(value)} is not true or false; write true or false"
        elif kind == "literal_error":
            message = unknown_name(value, choices(info), info.title or (leaf or dotted(loc)).split(".")[-1])
        else:  # a bound
            bounds, upper = value_range(info)
            fix = (info.json_schema_extra or {}).get("fix") or \
                f"use a number {'in ' if upper else ''}{bounds} such as {example:g}"
            message = f"{value} is not {bounds}; use a whole number {bounds} such as {example}" \
                if kind_of(info) is int else f"{show(value)} is {'outside' if upper else 'not'} {bounds}; {fix}"
        for line in message.split("\n") if kind == "value_error" else [message]:
            # Rules (raised by a whole model, at loc ()) write their own paths.
            lines.append(line if not loc and kind == "value_error" and leaf is None else f"{path or 'trial'}: {line}")
            locs.append(loc)
    return list(dict.fromkeys(lines)), locs
