"""Config keys declared once: each dataclass field carries its type, default, range and help.

    @dataclass
    class LoaderConfig:
        workers: int = setting(2, "reader processes", range=AT_LEAST_0)
        ...

`setting(default, help, range=...)` is a dataclasses field whose metadata holds the help line and the
allowed numbers (a `Range`); the choices of a string are its `Literal[...]` type. A nested section is
`section(Cls, help)`. From these declarations come the range checks (`range_error`) and the table of
every key (`describe`) that `trainer/main.py --help-config` prints; nothing restates them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

_SHOWN = {math.pi / 2: "pi/2"}  # bounds read better by name than as digits


def _num(x: float) -> str:
    return _SHOWN.get(x, f"{x:g}")


@dataclass(frozen=True)
class Range:
    """The numbers from lo to hi; `ends` says whether each end is in ('[', ']') or out ('(', ')').
    A list value is in range when every item is; None (a "use the default" value) always is."""

    lo: float = -math.inf
    hi: float = math.inf
    ends: str = "[]"

    def holds(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, (list, tuple)):
            return all(self.holds(v) for v in value)
        above = value >= self.lo if self.ends[0] == "[" else value > self.lo
        below = value <= self.hi if self.ends[1] == "]" else value < self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            if self.lo == 0 and self.ends[0] == "(":
                return "positive"
            return f"{'>=' if self.ends[0] == '[' else '>'} {_num(self.lo)}"
        return f"in {self.ends[0]}{_num(self.lo)}, {_num(self.hi)}{self.ends[1]}"


POSITIVE = Range(0, ends="(]")
AT_LEAST_0 = Range(0)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, "[)")  # momentum-like: 1 itself would never forget


def setting(default: Any, help: str, *, range: Range | None = None) -> Any:  # noqa: A002 (the word)
    """A config key: its default, one line of help, and the numbers it allows (None: any of its type).
    A list or dict default is copied for every instance."""
    meta = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:  # noqa: A002
    """A nested section of keys (a dataclass of settings)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "range": None})


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every key, a section before its own keys."""
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append((key, f, types_[f.name]))
        if is_section(types_[f.name]):
            out += fields(types_[f.name], key + ".")
    return out


def all_keys(cls: type) -> list[str]:
    return [key for key, _, _ in fields(cls)]


def range_error(obj: Any, prefix: str = "") -> tuple[str, Any, Range] | None:
    """The first (key, value, range) whose value is out of its field's range, else None."""
    for key, f, _ in fields(type(obj), prefix):
        allowed = f.metadata.get("range")
        if allowed is None:
            continue
        value = obj
        for part in key[len(prefix) :].split("."):
            value = getattr(value, part)
        if not allowed.holds(value):
            return key, value, allowed
    return None


def type_name(tp: Any) -> str:
    """A type as a user reads it: `float`, `list[int]`, `[float, float]`, `one of a, b`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in typing.get_args(tp)) + "]"
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def _split_choices(tp: Any) -> tuple[str, str]:
    """(type, choices) for the table: a Literal shows as str, its values in the range column."""
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    literals = [a for a in arms if typing.get_origin(a) is Literal]
    if not literals:
        return type_name(tp), ""
    shown = " or ".join("str" if typing.get_origin(a) is Literal else type_name(a) for a in arms)
    return shown, "|".join(str(v) for a in literals for v in typing.get_args(a))


def describe(cls: type) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, range, help) of every key of the dataclass `cls`, sections included."""
    rows = []
    defaults = cls()
    for key, f, tp in fields(cls):
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        if is_section(tp):
            rows.append((key, "section", "", "", f.metadata.get("help", "")))
            continue
        allowed = f.metadata.get("range")
        shown_type, choices = _split_choices(tp)
        rows.append(
            (key, shown_type, _shown(value), str(allowed) if allowed else choices, f.metadata.get("help", ""))
        )
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Plain aligned columns (no terminal needed); the last column runs on unpadded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
