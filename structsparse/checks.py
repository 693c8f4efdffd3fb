"""Plain-value checks shared by every reader of user input: recipes, group-Lasso specs, saved files.

Each returns the value (as a float where a number is asked for) or raises ``ValueError`` whose message
starts with ``where``, the key path of the value.
"""
from __future__ import annotations

import math
import reprlib

__all__ = ["is_int", "is_number", "number", "show"]


def is_int(v) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(value, where: str, minimum: float | None = None, positive: bool = False,
           maximum: float | None = None) -> float:
    """A finite number within the bounds, as a float."""
    if not is_number(value):
        raise ValueError(f"{where}: expected a number, got {show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{where}: must be > 0, got {value:g}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where}: must be <= {maximum:g}, got {value:g}")
    return value


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 60, 60


def show(value) -> str:
    """A value as error messages quote it: its repr (shortened: a few levels, items and characters, never
    the whole of a large value) and type, or ``null``."""
    if value is None:
        return "null"
    return f"{_SHORT.repr(value)} ({type(value).__name__})"
