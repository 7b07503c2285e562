"""SpecError, and key and type checks of user-written options (job files, --engine KEY=VALUE)
against a dataclass's own annotations: a typo or a quoted number is reported by name before
anything starts, instead of surfacing as a TypeError deep inside a Ray actor."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

_NONE = type(None)


class SpecError(ValueError):
    """A job spec that cannot run; the message says which field and why."""


def unknown_keys(where: str, got: Mapping, known) -> None:
    """SpecError naming each unknown key, with the closest known key when one is near."""
    extra = sorted(set(got) - set(known))
    if not extra:
        return
    hints = []
    for k in extra:
        close = difflib.get_close_matches(str(k), [str(x) for x in known], n=1, cutoff=0.6)
        hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    raise SpecError(
        f"{where}: unknown key{'s' if len(extra) > 1 else ''} {', '.join(hints)}; "
        f"known keys: {', '.join(sorted(map(str, known)))}"
    )


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is _NONE:
        return "null"
    if origin is not None:
        hint = origin
    return {
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
        tuple: "a list",
        collections.abc.Mapping: "a table",
        dict: "a table",
        os.PathLike: "a path",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def matches(value: Any, hint) -> bool:
    """Whether `value` fits the annotation `hint` (Union, Optional, tuple[...], Mapping, scalars)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if hint is _NONE:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer is a fine number ("gpus = 1")
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return True
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model: leave it to __post_init__


def check_types(where: str, cls: type, values: Mapping, skip: tuple[str, ...] = ()) -> None:
    """SpecError for the first value whose type does not fit `cls`'s field annotation."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k in skip or k not in names:
            continue
        if not matches(v, hints[k]):
            raise SpecError(f"{where}: {k} must be {_describe(hints[k])}, got {v!r} ({type(v).__name__})")


def build(where: str, cls: type, values: Mapping, skip: tuple[str, ...] = ()):
    """`cls(**values)` after key and type checks; its own validation errors become SpecError."""
    unknown_keys(where, values, {f.name for f in dataclasses.fields(cls)})
    check_types(where, cls, values, skip)
    try:
        return cls(**values)
    except SpecError:
        raise
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {e}") from e
