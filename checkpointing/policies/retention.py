"""What to keep: pure retention rules over a list of committed checkpoints.

Each rule returns the steps it keeps with the reasons why; a checkpoint survives if any
rule keeps it. Rules see only the plain data of the checkpoints still on disk (step,
commit time, metrics), so a new process deciding from the survivors reaches the same
answer and deleting again removes nothing more.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from checkpointing._checks import check_int, check_policies, check_positive_number, check_steps
from checkpointing.errors import InvalidOptionError

Reasons = Mapping[int, tuple[str, ...]]

REASON_LATEST = "latest"
REASON_PROTECTED = "protected"
REASON_IN_PROGRESS = "in progress"
REASON_NO_METRICS = "no metrics"
REASON_KEEP_ALL = "max_to_keep=None"
REASON_REFERENCED = "holds tensors of step"  # "... of step 300": an incremental save


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as retention sees it. Hashable although metrics are a dict.

    Attributes:
        step: The step.
        time: When it was committed, in seconds of the manager's clock.
        metrics: Its metrics (possibly nested), with those recorded since; None if none.
    """

    step: int
    time: float  # commit time, clock seconds
    metrics: Mapping[str, Any] | None = field(hash=False)  # may be nested


@runtime_checkable
class RetentionPolicy(Protocol):
    """Anything with this ``keep`` method can decide what survives.

    Pass one as ``CheckpointManagerOptions(retention_policy=...)``. On top of what it
    keeps, the manager keeps protected steps, steps being read or written, and the
    newest one (``always_keep_latest``).
    """

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """Choose the checkpoints this rule keeps, with the reasons shown by
        ``retention_report`` and ``checkpointing ls``.

        Decide from the arguments alone, so that deciding again from the survivors
        deletes nothing more.

        Args:
            checkpoints: The committed checkpoints, sorted by step, ascending.
            now: The manager's clock, for rules that depend on age.

        Returns:
            ``{step: reasons}``. A step that is absent, or maps to no reason, is not
            kept by this rule; a step not among ``checkpoints`` is an error.
        """
        ...


@dataclass(frozen=True)
class KeepLatest:
    """Keep the ``n`` newest checkpoints.

    Attributes:
        n: How many; 0 keeps none by this rule.
    """

    n: int

    def __post_init__(self) -> None:
        check_int("KeepLatest n", self.n, low=0)

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """The newest ``n`` (see `RetentionPolicy.keep`)."""
        kept = checkpoints[max(0, len(checkpoints) - self.n) :]
        return {c.step: (f"latest {self.n}",) for c in kept}


@dataclass(frozen=True)
class KeepEveryNSteps:
    """Keep every step divisible by ``n``, forever (Orbax's ``keep_period``).

    With ``exact=False``, keep instead the step closest to each multiple of ``n`` (the
    earlier one of two as close): for saves that do not land on multiples, e.g. saves
    by time. Each checkpoint belongs to its nearest multiple, so deleting the others
    never changes which one a multiple keeps. ``max_to_keep`` keeps only the newest
    that many of these.

    Attributes:
        n: The interval in steps, at least 1.
        exact: Keep only exact multiples of ``n``; False keeps the closest step to each.
        max_to_keep: Keep only the newest this many of the chosen steps (None: all).
    """

    n: int
    exact: bool = True
    max_to_keep: int | None = None

    def __post_init__(self) -> None:
        check_int("KeepEveryNSteps n", self.n, low=1)
        check_int("KeepEveryNSteps max_to_keep", self.max_to_keep, low=1, optional=True)

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """The steps at (or closest to) each multiple of ``n`` (see
        `RetentionPolicy.keep`)."""
        if self.exact:
            chosen = [c.step for c in checkpoints if c.step % self.n == 0]
            reason = (f"every {self.n} steps",)
        else:
            nearest: dict[int, int] = {}  # multiple of n -> the closest step to it
            for c in checkpoints:  # ascending: on a tie the earlier step stays
                multiple = (c.step + self.n // 2) // self.n * self.n
                if multiple not in nearest or abs(c.step - multiple) < abs(
                    nearest[multiple] - multiple
                ):
                    nearest[multiple] = c.step
            chosen = sorted(nearest.values())
            reason = (f"closest to every {self.n} steps",)
        if self.max_to_keep is not None:
            chosen = chosen[-self.max_to_keep :]
        return dict.fromkeys(chosen, reason)


@dataclass(frozen=True)
class KeepNewerThan:
    """Keep every checkpoint committed less than ``secs`` ago.

    Attributes:
        secs: The age limit, in seconds of the manager's clock.
    """

    secs: float

    def __post_init__(self) -> None:
        check_positive_number("KeepNewerThan secs", self.secs)

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """The checkpoints younger than ``secs`` at ``now`` (see `RetentionPolicy.keep`)."""
        reason = (f"newer than {self.secs:g}s",)
        return {c.step: reason for c in checkpoints if now - c.time < self.secs}


@dataclass(frozen=True)
class KeepEveryNSeconds:
    """Keep about one checkpoint per ``secs`` of commit time (Orbax's ``keep_time_interval``).

    Walking oldest first, the oldest checkpoint is kept, then each one committed at least
    ``secs`` after the previously kept one. The walk depends only on checkpoints it keeps,
    so deleting the others never changes it.

    Attributes:
        secs: The interval, in seconds of commit time.
    """

    secs: float

    def __post_init__(self) -> None:
        check_positive_number("KeepEveryNSeconds secs", self.secs)

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """About one checkpoint per ``secs`` (see `RetentionPolicy.keep`)."""
        reason = (f"one per {self.secs:g}s",)
        kept: dict[int, tuple[str, ...]] = {}
        last_time: float | None = None
        for c in checkpoints:
            if last_time is None or c.time >= last_time + self.secs:
                kept[c.step] = reason
                last_time = c.time
        return kept


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` best checkpoints by a metric.

    ``metric`` is a key of the metrics dict (``"val/loss"``, as Lightning and W&B log
    them), else a ``"/"``-separated path into it (``{"eval": {"loss": ...}}``), or a
    function of the metrics. A checkpoint is unranked when it has no metrics, the path is
    missing, or the value is not a finite number (a function may return NaN to say so).
    Unranked checkpoints are all kept when ``keep_without_metrics``; otherwise they only
    fill the slots the ranked ones leave free, newest first, as Orbax does. Between equal
    scores the newer step wins.

    Attributes:
        n: How many of the best to keep.
        metric: A key or ``"/"``-separated path into the metrics, or a function of them.
        mode: Whether the highest ("max") or the lowest ("min") value is best.
        keep_without_metrics: Keep every unranked checkpoint.
    """

    n: int
    metric: str | Callable[[Mapping[str, Any]], float]
    mode: Literal["min", "max"] = "max"
    keep_without_metrics: bool = True

    def __post_init__(self) -> None:
        check_int("KeepBest n", self.n, low=0)
        if self.mode not in ("min", "max"):
            raise InvalidOptionError(f"KeepBest mode must be 'min' or 'max', got {self.mode!r}")
        if isinstance(self.metric, str):
            if not self.metric.strip("/"):
                raise InvalidOptionError(
                    f"KeepBest metric must be a '/'-separated key path, got {self.metric!r}"
                )
        elif not callable(self.metric):
            raise InvalidOptionError(
                f"KeepBest metric must be a key path or a function, got {self.metric!r}"
            )

    @property
    def _label(self) -> str:
        """The reason given for a ranked checkpoint, e.g. ``best 2 by loss (min)``."""
        if isinstance(self.metric, str):
            name = self.metric.strip("/")
        else:
            name = getattr(self.metric, "__name__", "<lambda>")
            name = "best_fn" if name == "<lambda>" else name
        return f"best {self.n} by {name} ({self.mode})"

    def score(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The value a checkpoint is ranked on.

        Args:
            metrics: A checkpoint's metrics, or None when it has none.

        Returns:
            The value, higher is better whatever the mode; None when unranked.
        """
        if metrics is None:
            return None
        if isinstance(self.metric, str) and self.metric in metrics:
            value: Any = metrics[self.metric]  # a flat key with slashes ("val/loss")
        elif isinstance(self.metric, str):
            value = metrics
            for key in filter(None, self.metric.split("/")):
                if not isinstance(value, Mapping) or key not in value:
                    return None
                value = value[key]
        else:
            value = self.metric(metrics)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return None
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float: no rank to give it
            return None
        if not math.isfinite(number):
            return None
        return number if self.mode == "max" else -number

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """The ``n`` best, and the unranked as configured (see `RetentionPolicy.keep`)."""
        ranked: list[tuple[float, int]] = []
        unranked: list[int] = []
        for c in checkpoints:
            score = self.score(c.metrics)
            if score is None:
                unranked.append(c.step)
            else:
                ranked.append((score, c.step))
        ranked.sort()  # worst first; equal scores: older first, so the newer one is kept
        best = (self._label,)
        kept = {step: best for _, step in ranked[max(0, len(ranked) - self.n) :]}
        if self.keep_without_metrics:
            kept.update((step, (REASON_NO_METRICS,)) for step in unranked)
        else:
            free = max(0, self.n - len(ranked))
            filler = (f"{self._label}: unranked, free slot",)
            kept.update((step, filler) for step in unranked[max(0, len(unranked) - free) :])
        return kept


@dataclass(frozen=True)
class KeepSteps:
    """Keep exactly these steps (milestones worth keeping whatever else happens).

    Attributes:
        steps: The steps (ints >= 0), stored as a frozenset.
    """

    steps: Collection[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_steps("KeepSteps steps", self.steps))

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """Those of ``steps`` that are among the checkpoints (see `RetentionPolicy.keep`)."""
        return {c.step: ("listed steps",) for c in checkpoints if c.step in self.steps}


@dataclass(frozen=True, init=False)
class KeepAnyOf:
    """Keep what any of the rules keeps, with all of their reasons.

    Args:
        *policies: The rules, at least one.

    Attributes:
        policies: The rules, in the order given.
    """

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        check_policies("KeepAnyOf", policies, RetentionPolicy, "retention policies (with keep)")
        object.__setattr__(self, "policies", policies)

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Reasons:
        """The union of what ``policies`` keep (see `RetentionPolicy.keep`)."""
        merged: dict[int, tuple[str, ...]] = {}
        for policy in self.policies:
            for step, reasons in policy.keep(checkpoints, now).items():
                merged[step] = _union(merged.get(step, ()), tuple(reasons))
        return merged


@dataclass(frozen=True)
class RetentionDecision:
    """The outcome: every surviving step with its (non-empty) reasons, and what to delete."""

    keep: Mapping[int, tuple[str, ...]]
    delete: tuple[int, ...]  # ascending


def decide_retention(
    checkpoints: Collection[CheckpointInfo],
    policy: RetentionPolicy | None,
    *,
    now: float,
    protected: Collection[int] = (),
    in_progress: Collection[int] = (),
    always_keep_latest: bool = True,
    references: Mapping[int, Collection[int]] | None = None,
) -> RetentionDecision:
    """Decide which of ``checkpoints`` survive.

    ``policy`` None keeps everything. On top of the policy, the newest checkpoint is kept
    when ``always_keep_latest`` (it is the resume point; False reproduces Orbax, which
    deletes it when it ranks outside the best N), and ``protected`` (pinned by the user) and
    ``in_progress`` (being written or read) steps are never deleted. Steps in those two
    that are not among ``checkpoints`` are ignored. ``references`` maps a step to the
    steps whose files hold some of its tensors (an incremental save): a surviving step
    keeps those too, and theirs in turn.
    """
    ordered = sorted(checkpoints, key=lambda c: c.step)
    steps = [c.step for c in ordered]
    duplicates = sorted({a for a, b in itertools.pairwise(steps) if a == b})
    if duplicates:
        raise InvalidOptionError(f"steps {duplicates} appear twice among the checkpoints")
    present = set(steps)
    kept: dict[int, tuple[str, ...]] = {}

    def add(step: int, reasons: tuple[str, ...]) -> None:
        kept[step] = _union(kept.get(step, ()), reasons)

    if policy is None:
        for step in steps:
            add(step, (REASON_KEEP_ALL,))
    else:
        for step, reasons in policy.keep(ordered, now).items():
            if step not in present:
                raise InvalidOptionError(
                    f"retention policy {policy!r} kept step {step}, "
                    f"which is not among the checkpoints"
                )
            add(step, tuple(reasons))
    if always_keep_latest and steps:
        add(steps[-1], (REASON_LATEST,))
    for extra, reason in ((protected, REASON_PROTECTED), (in_progress, REASON_IN_PROGRESS)):
        for step in present.intersection(extra):
            add(step, (reason,))
    refs = {step: present.intersection(origins) for step, origins in (references or {}).items()}
    surviving = {step for step in steps if kept.get(step)}
    todo = list(surviving)
    while todo:  # a surviving step's references survive, and theirs in turn
        new = refs.get(todo.pop(), set()) - surviving
        surviving |= new
        todo += new
    for step in steps:
        if step in surviving:
            for origin in sorted(refs.get(step, ())):
                add(origin, (f"{REASON_REFERENCED} {step}",))
    return RetentionDecision(
        keep={step: kept[step] for step in steps if kept.get(step)},
        delete=tuple(step for step in steps if not kept.get(step)),
    )


def best_rules_ranking_nothing(
    policy: RetentionPolicy | None, checkpoints: Collection[CheckpointInfo]
) -> list[KeepBest]:
    """The best-N rules of ``policy`` that rank none of ``checkpoints``: a misspelt
    metric, say, which leaves the other rules to delete what should have been best."""
    if isinstance(policy, KeepAnyOf):
        return [r for p in policy.policies for r in best_rules_ranking_nothing(p, checkpoints)]
    if not isinstance(policy, KeepBest) or not checkpoints:
        return []
    return [policy] if all(policy.score(c.metrics) is None for c in checkpoints) else []


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + second))
