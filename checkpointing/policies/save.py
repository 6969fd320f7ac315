"""When to save: small, pure rules over a `SaveContext`.

Rules read only the context (no clock, no disk), so a manager can evaluate them on any
host and tests can drive them with a fake clock. Combine rules with `AnyOf`; the manager
asks `decide_save`, which also refuses steps at or below the newest one saved or being
saved.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from checkpointing._checks import check_int, check_policies, check_positive_number, check_steps


@dataclass(frozen=True)
class SaveContext:
    """What a save rule may look at. Times are readings of the manager's clock, in seconds."""

    step: int
    latest_step: int | None  # newest step committed or being saved; None if none
    last_save_time: float | None  # when the save of ``latest_step`` began; None if none
    now: float
    preempted: bool = False  # a preemption signal has been received
    saving: bool = False  # an async save is still being written


@runtime_checkable
class SavePolicy(Protocol):
    """Anything with ``should_save(ctx) -> bool`` can decide when to save."""

    def should_save(self, ctx: SaveContext) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step % n == 0``."""

    n: int

    def __post_init__(self) -> None:
        check_int("EveryNSteps n", self.n, low=1)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class AtSteps:
    """Save at exactly these steps (for example the last step, or evaluation points)."""

    steps: Collection[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_steps("AtSteps steps", self.steps))

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step in self.steps


@dataclass(frozen=True)
class EveryNSeconds:
    """Save when at least ``secs`` have passed since the newest save began (committed
    or still being written, so a slow async save does not make every step due).

    With no save yet the rule is due at once, as in Orbax's time-based policy:
    a run that has never saved is the one with the most to lose.
    """

    secs: float

    def __post_init__(self) -> None:
        check_positive_number("EveryNSeconds secs", self.secs)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.secs


@dataclass(frozen=True)
class Continuous:
    """Save whenever no save is being written, and at least ``min_interval_secs`` after
    the newest save began (Orbax's continuous checkpointing): as fresh a resume point as
    the disk allows, never waiting for a save in flight."""

    min_interval_secs: float = 0.0

    def __post_init__(self) -> None:
        if self.min_interval_secs != 0:
            check_positive_number("Continuous min_interval_secs", self.min_interval_secs)

    def should_save(self, ctx: SaveContext) -> bool:
        if ctx.saving:
            return False
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.min_interval_secs


@dataclass(frozen=True)
class InitialSave:
    """Save the first step seen while the directory has no checkpoint."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.latest_step is None


@dataclass(frozen=True)
class OnPreemption:
    """Save once a preemption signal has arrived, so the job can exit without losing work."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.preempted


@dataclass(frozen=True, init=False)
class AnyOf:
    """Save when any of the rules says so."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        check_policies("AnyOf", policies, SavePolicy, "save policies (with should_save)")
        object.__setattr__(self, "policies", policies)

    def should_save(self, ctx: SaveContext) -> bool:
        return any(policy.should_save(ctx) for policy in self.policies)


def decide_save(policy: SavePolicy, ctx: SaveContext) -> bool:
    """The manager's question: never a step at or below the newest one saved or being
    saved.

    Committed steps are never overwritten and steps only move forward, so such a save
    could only fail; answering no here keeps every policy free of that check.
    """
    if ctx.latest_step is not None and ctx.step <= ctx.latest_step:
        return False
    return policy.should_save(ctx)
