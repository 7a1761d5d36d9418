"""[any] The house's validation helpers: one message shape for every bad value.

Each raises :class:`sparkdl.errors.ConfigError` (or the error type given) with the message
``"<name> must be <constraint>, got <value>. <how to fix>."``, so every check across the package
reads the same way and names both the value and the way out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from sparkdl.errors import ConfigError

__all__ = [
    "fail",
    "expect_int",
    "expect_number",
    "expect_bool",
    "expect_choice",
    "expect_name",
    "expect_columns",
]


def fail(name: str, constraint: str, value: Any, fix: str, error: type = ConfigError) -> Exception:
    """The house message as an exception (to ``raise``): ``name must be constraint, got value.``"""
    fix = fix.rstrip(".")
    return error(f"{name} must be {constraint}, got {value!r}. {fix}.")


def expect_int(name: str, value: Any, fix: str, *, low: int = 1) -> int:
    """``value`` when it is an int (not a bool) ≥ ``low``; else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise fail(name, f"an integer ≥ {low}", value, fix)
    return value


def expect_number(
    name: str,
    value: Any,
    fix: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a float when it is a real number (not a bool, not NaN) within the given
    bounds (``at_least`` inclusive, ``above`` and ``below`` exclusive); else ConfigError."""
    bounds = []
    if at_least is not None:
        bounds.append(f"≥ {at_least:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and not math.isnan(value)
    ok = ok and (at_least is None or value >= at_least) and (above is None or value > above)
    ok = ok and (below is None or value < below)
    if not ok:
        constraint = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise fail(name, constraint, value, fix)
    return float(value)


def expect_bool(name: str, value: Any, fix: str = "Pass True or False") -> bool:
    """``value`` when it is True or False (not 0/1 or a string); else ConfigError."""
    if not isinstance(value, bool):
        raise fail(name, "True or False", value, fix)
    return value


def expect_choice(name: str, value: Any, choices: Sequence[Any], fix: str) -> Any:
    """``value`` when it is one of ``choices``; else ConfigError listing them."""
    if value not in choices:
        raise fail(name, f"one of {tuple(choices)}", value, fix)
    return value


def expect_name(name: str, value: Any, fix: str = "Set it") -> str:
    """``value`` when it is a non-empty string (a column name, a path); else ConfigError."""
    if not isinstance(value, str) or not value:
        raise fail(name, "a non-empty string", value, fix)
    return value


def expect_columns(
    name: str, value: Any, fix: str, *, available: Iterable[str] | None = None
) -> list[str]:
    """``value`` as a list when it is a non-empty list of column names, each in ``available``
    (when given); else ConfigError naming the missing ones and the columns there are."""
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(c, str) and c for c in value)
    ):
        raise fail(name, "a non-empty list of column names", value, fix)
    if available is not None:
        present = list(available)
        missing = [c for c in value if c not in present]
        if missing:
            raise fail(name, f"columns of the DataFrame {present}", missing, "Fix the column names")
    return list(value)
