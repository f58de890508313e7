"""The words of every message: a value as the user wrote it, a list of names, "did you mean", an unknown
name. Every line a user reads about a spec reads "<field path>: <what is wrong>; <how to fix>"."""

import difflib
import math
from typing import Any

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
