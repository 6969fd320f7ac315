"""The argument checks that options, policies and the manager share: one copy of each
rule, each raising `InvalidOptionError` with the name and the value it was given."""

from __future__ import annotations

import math
from collections.abc import Collection

from checkpointing.errors import InvalidOptionError


def is_int(value: object) -> bool:
    """An int, and not a bool (``True`` is an int to Python, never a step or a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def check_int(name: str, value: object, *, low: int, optional: bool = False) -> None:
    """``value`` is an int >= ``low`` (or None, when ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value < low:  # type: ignore[operator]
        none = " or None" if optional else ""
        raise InvalidOptionError(f"{name} must be an int >= {low}{none}, got {value!r}")


def check_positive_number(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` is a finite number > 0 (or None, when ``optional``)."""
    if value is None and optional:
        return
    if not is_positive_number(value):
        none = " or None" if optional else ""
        raise InvalidOptionError(f"{name} must be a positive number{none}, got {value!r}")


def check_steps(name: str, steps: object) -> frozenset[int]:
    """``steps`` as a frozenset, if it is a collection of ints >= 0 (not a string)."""
    if (
        not isinstance(steps, Collection)
        or isinstance(steps, str | bytes)
        or not all(is_int(s) and s >= 0 for s in steps)
    ):
        raise InvalidOptionError(f"{name} must be a collection of ints >= 0, got {steps!r}")
    return frozenset(steps)


def check_policies(name: str, policies: tuple[object, ...], kind: type, what: str) -> None:
    """A combinator's ``policies``: at least one, each a ``kind`` (a runtime-checkable
    protocol; ``what`` says which, e.g. "save policies (with should_save)")."""
    if not policies:
        raise InvalidOptionError(f"{name} needs at least one of the {what}")
    for policy in policies:
        if not isinstance(policy, kind):
            raise InvalidOptionError(f"{name} takes {what}, got {policy!r}")
