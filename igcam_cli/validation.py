"""What a config field allows, declared on the field's type, and the check `config.build` runs.

A field's annotation says everything a value must be: its type (`int`, `float`, `bool`, `str`,
`list[...]`, `X | None`), its choices (`Literal[...]`) and its range (`Annotated[int, Range(1)]`).
Rules that tie two fields together (`scale_min <= scale_max`) are a config class's `RULES`.
Every value is checked when the config is built, so `igcam run` refuses a bad igcam.toml before
its first stage starts, in one line that names where the value came from, what it was and what
is allowed.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from igcam_cli.errors import UsageError


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (None: unbounded); `low_open` / `high_open` exclude the ends.
    On a list it bounds every element, and the list must not be empty."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Rule:
    """A condition on several fields of one config, with what it asks in words."""

    fields: tuple[str, ...]
    holds: Callable[[Any], bool]
    says: str


# The ranges the configs use, by name
Count = Annotated[int, Range(1)]  # epochs, batch sizes, steps
NonNegative = Annotated[int, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Scales = Annotated[list[float], Range(0, low_open=True)]


def check(config: Any, source: Callable[[str], str]) -> None:
    """Raise UsageError (exit 2) for the first field of `config` its annotation does not allow, then
    for the first of its class's RULES that fails. `source(name)` says where a field's value came
    from (e.g. "igcam.toml [crf] preset" or "--preset")."""
    hints = get_type_hints(type(config), include_extras=True)
    for f in fields(config):
        value = getattr(config, f.name)
        if not _fits(hints[f.name], value):
            raise UsageError(f"{source(f.name)}: {value!r} is not allowed ({allowed(hints[f.name])})")
    for rule in getattr(type(config), "RULES", ()):
        if not rule.holds(config):
            given = ", ".join(f"{f} = {getattr(config, f)!r}" for f in rule.fields)
            named = [source(f) for f in rule.fields if not source(f).endswith("(default)")]  # what the user set
            raise UsageError(f"{(named or [source(rule.fields[0])])[0]}: {given}; {rule.says}")


def allowed(hint: Any) -> str:
    """What an annotation allows, in words (for messages and help texts)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base, ranges = args[0], [a for a in args[1:] if isinstance(a, Range)]
        if get_origin(base) is list:
            return f"a non-empty list of numbers {ranges[0]}" if ranges else allowed(base)
        return f"{allowed(base)} {ranges[0]}" if ranges else allowed(base)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(allowed(a) for a in args)
    if origin is list:
        return "a list of numbers" if args and args[0] in (int, float) else f"a list ({allowed(args[0])} each)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}.get(
        hint, str(hint)
    )


def says_more_than_its_type(hint: Any) -> bool:
    """Whether an annotation declares choices (Literal) or a Range (Annotated), alone or in a union:
    what `allowed` is worth printing for (help texts)."""
    if get_origin(hint) in (Literal, Annotated):
        return True
    return get_origin(hint) in (Union, types.UnionType) and any(says_more_than_its_type(a) for a in get_args(hint))


def _fits(hint: Any, value: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base, ranges = args[0], [a for a in args[1:] if isinstance(a, Range)]
        if not _fits(base, value):
            return False
        numbers = value if isinstance(value, list) else [value]
        if isinstance(value, list) and ranges and not value:
            return False
        return all(r.admits(x) for r in ranges for x in numbers)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(args[0], v) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)
