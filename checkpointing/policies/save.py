"""When to save: small, pure rules over a `SaveContext`.

Rules read only the context (no clock, no disk), so a manager can evaluate them on any
host and tests can drive them with a fake clock. Combine rules with `AnyOf`; the manager
asks `decide_save`, which also refuses steps at or below the newest one saved or being
saved.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from checkpointing.errors import InvalidOptionError

if TYPE_CHECKING:
    from checkpointing.options import CheckpointManagerOptions


@dataclass(frozen=True)
class SaveContext:
    """What a save rule may look at. Times are readings of the manager's clock, in seconds."""

    step: int
    latest_step: int | None  # newest step committed or being saved; None if none
    last_save_time: float | None  # when the save of ``latest_step`` began; None if none
    now: float
    preempted: bool = False  # a preemption signal has been received


@runtime_checkable
class SavePolicy(Protocol):
    """Anything with ``should_save(ctx) -> bool`` can decide when to save."""

    def should_save(self, ctx: SaveContext) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step % n == 0``."""

    n: int

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise InvalidOptionError(f"EveryNSteps needs an int n >= 1, got {self.n!r}")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class AtSteps:
    """Save at exactly these steps (for example the last step, or evaluation points)."""

    steps: Collection[int]

    def __post_init__(self) -> None:
        if isinstance(self.steps, str | bytes) or not all(
            _is_int(s) and s >= 0 for s in self.steps
        ):
            raise InvalidOptionError(
                f"AtSteps needs a collection of non-negative ints, got {self.steps!r}"
            )
        object.__setattr__(self, "steps", frozenset(self.steps))

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
        if not _is_positive_number(self.secs):
            raise InvalidOptionError(
                f"EveryNSeconds needs a positive number of seconds, got {self.secs!r}"
            )

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.secs


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
        if not policies:
            raise InvalidOptionError("AnyOf needs at least one save policy")
        for policy in policies:
            if not isinstance(policy, SavePolicy):
                raise InvalidOptionError(
                    f"AnyOf takes save policies (with should_save), got {policy!r}"
                )
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


def configured_save_rules(options: CheckpointManagerOptions) -> list[SavePolicy]:
    """The rules the step, time and initial-save fields set, or ``[save_policy]``, which
    replaces them; without the every-step default and the preemption rule (adapters
    that add their own rules start from these)."""
    if options.save_policy is not None:
        return [options.save_policy]
    rules: list[SavePolicy] = []
    if options.save_interval_steps is not None:
        rules.append(EveryNSteps(options.save_interval_steps))
    if options.save_on_steps is not None:
        rules.append(AtSteps(options.save_on_steps))
    if options.save_interval_secs is not None:
        rules.append(EveryNSeconds(options.save_interval_secs))
    if options.save_on_initial:
        rules.append(InitialSave())
    return rules


def save_policy_from_options(options: CheckpointManagerOptions) -> SavePolicy:
    """Build the save policy the option fields describe.

    ``save_policy`` replaces the step, time and initial-save fields. ``save_on_preemption``
    is OR'ed in either way, because it also installs the signal handler. With none of
    ``save_interval_steps``, ``save_on_steps`` or ``save_interval_secs`` set, every step
    is due; an explicitly empty ``save_on_steps`` counts as set (save only on preemption
    or initially, say).
    """
    rules = configured_save_rules(options)
    if all(isinstance(rule, InitialSave) for rule in rules):
        rules.insert(0, EveryNSteps(1))
    if options.save_on_preemption:
        rules.append(OnPreemption())
    return rules[0] if len(rules) == 1 else AnyOf(*rules)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
