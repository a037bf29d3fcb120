"""One vocabulary for argument checks: each raises with the argument's name, the valid values and what was given.

Example:
    >>> check_int("every_n_steps", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: `every_n_steps` must be an int >= 1, got 0.
    >>> check_fraction("fraction", 0.25)
    0.25
    >>> check_dtype("dtype", "bfloat16")
    torch.bfloat16
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DTYPE_NAMES", "check_amount", "check_bool", "check_dtype", "check_fraction", "check_int", "check_number",
           "round_half_up"]

#: The dtype names an error message suggests; any floating dtype's name as torch spells it is taken (``"half"``).
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")


def check_int(name: str, value: Any, minimum: int = 0, allow_none: bool = False) -> Any:
    """``value`` when it is an int ``>= minimum`` (or ``None`` when allowed); bool is not an int here."""
    if allow_none and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an int >= {minimum}{extra}, got {value!r}.")
    return value


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """``value`` when it is a real number in the interval ``low``..``high`` (ends open or closed as asked); the
    message shows a one-sided interval as ``> low`` (``>=``, ``<``, ``<=``)."""
    if allow_none and value is None:
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isfinite(low) and math.isinf(high):
            interval = f"{'>' if low_open else '>='} {low:g}"
        elif math.isinf(low) and math.isfinite(high):
            interval = f"{'<' if high_open else '<='} {high:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a number {interval}{extra}, got {value!r}.")
    return value


def check_fraction(name: str, value: Any) -> Any:
    """``value`` when it is a number in the open interval (0, 1)."""
    return check_number(name, value, 0.0, 1.0, low_open=True, high_open=True)


def round_half_up(fraction: float, n: int) -> int:
    """``fraction`` of ``n`` items as a count, halves rounded up (not to even, as ``round`` does)."""
    return math.floor(fraction * n + 0.5)


def check_bool(name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_dtype(name: str, value: Any, allow_none: bool = False) -> Any:
    """The floating ``torch.dtype`` that ``value`` is or names (``torch.bfloat16`` or ``"bfloat16"``: the name of a
    ``torch`` attribute), or ``None`` when allowed; an integer or complex dtype is refused."""
    if allow_none and value is None:
        return value
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        extra = " or None" if allow_none else ""
        raise ValueError(
            f"`{name}` must be a floating torch.dtype or its name ({', '.join(DTYPE_NAMES)}){extra}, got {value!r}."
        )
    return resolved


def check_amount(amounts: Mapping[str, Any], what: str) -> tuple[str, Any]:
    """``(name, value)`` of the one amount of ``amounts`` given (not ``None``); raises unless exactly one is, and
    valid: a number in (0, 1) for a name holding ``fraction``, an int >= 1 for any other.

    Example:
        >>> check_amount({"num_layers": None, "fraction": 0.25}, "how many blocks to remove")
        ('fraction', 0.25)
    """
    given = {name: value for name, value in amounts.items() if value is not None}
    if len(given) != 1:
        names = ", ".join(f"`{name}`" for name in amounts)
        raise ValueError(f"give exactly one of {names} ({what}), got {given or 'none'}.")
    ((name, value),) = given.items()
    if "fraction" in name:
        return name, check_fraction(name, value)
    return name, check_int(name, value, minimum=1)
