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
    """What a save rule may look at. Times are readings of the manager's clock, in seconds.

    Attributes:
        step: The step the training loop is at.
        latest_step: The newest step committed or being saved; None if none.
        last_save_time: When the save of ``latest_step`` began; None if none.
        now: The time of the question.
        preempted: A preemption signal has been received.
        saving: An async save is still being written.
    """

    step: int
    latest_step: int | None  # newest step committed or being saved; None if none
    last_save_time: float | None  # when the save of ``latest_step`` began; None if none
    now: float
    preempted: bool = False  # a preemption signal has been received
    saving: bool = False  # an async save is still being written


@runtime_checkable
class SavePolicy(Protocol):
    """Anything with ``should_save(ctx) -> bool`` can decide when to save.

    Pass one as ``CheckpointManagerOptions(save_policy=...)``. The manager never asks
    about a step at or below the newest one saved, so a policy need not check that.
    """

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether to save ``ctx.step``.

        Read only ``ctx`` (no clock, no disk): in a distributed job the primary decides
        for every process.

        Args:
            ctx: The step, the newest save and the time.

        Returns:
            True to save the step.
        """
        ...


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step % n == 0``.

    Attributes:
        n: The interval in steps, at least 1.
    """

    n: int

    def __post_init__(self) -> None:
        check_int("EveryNSteps n", self.n, low=1)

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether ``ctx.step`` is a multiple of ``n`` (see `SavePolicy.should_save`)."""
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class AtSteps:
    """Save at exactly these steps (for example the last step, or evaluation points).

    Attributes:
        steps: The steps (ints >= 0), stored as a frozenset.
    """

    steps: Collection[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_steps("AtSteps steps", self.steps))

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether ``ctx.step`` is one of ``steps`` (see `SavePolicy.should_save`)."""
        return ctx.step in self.steps


@dataclass(frozen=True)
class EveryNSeconds:
    """Save when at least ``secs`` have passed since the newest save began (committed
    or still being written, so a slow async save does not make every step due).

    With no save yet the rule is due at once, as in Orbax's time-based policy:
    a run that has never saved is the one with the most to lose.

    Attributes:
        secs: The interval in seconds of the manager's clock.
    """

    secs: float

    def __post_init__(self) -> None:
        check_positive_number("EveryNSeconds secs", self.secs)

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether ``secs`` have passed since the newest save began (see
        `SavePolicy.should_save`)."""
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.secs


@dataclass(frozen=True)
class Continuous:
    """Save whenever no save is being written, and at least ``min_interval_secs`` after
    the newest save began (Orbax's continuous checkpointing): as fresh a resume point as
    the disk allows, never waiting for a save in flight.

    Attributes:
        min_interval_secs: The least time between the starts of two saves, in seconds.
    """

    min_interval_secs: float = 0.0

    def __post_init__(self) -> None:
        if self.min_interval_secs != 0:
            check_positive_number("Continuous min_interval_secs", self.min_interval_secs)

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether no save is in flight and the interval has passed (see
        `SavePolicy.should_save`)."""
        if ctx.saving:
            return False
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.min_interval_secs


@dataclass(frozen=True)
class InitialSave:
    """Save the first step seen while the directory has no checkpoint."""

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether no step was saved yet (see `SavePolicy.should_save`)."""
        return ctx.latest_step is None


@dataclass(frozen=True)
class OnPreemption:
    """Save once a preemption signal has arrived, so the job can exit without losing work."""

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether a preemption signal arrived (see `SavePolicy.should_save`)."""
        return ctx.preempted


@dataclass(frozen=True, init=False)
class AnyOf:
    """Save when any of the rules says so.

    Args:
        *policies: The rules, at least one.

    Attributes:
        policies: The rules, in the order given.
    """

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        check_policies("AnyOf", policies, SavePolicy, "save policies (with should_save)")
        object.__setattr__(self, "policies", policies)

    def should_save(self, ctx: SaveContext) -> bool:
        """Whether any of ``policies`` says so (see `SavePolicy.should_save`)."""
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
