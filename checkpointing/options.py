"""`CheckpointManagerOptions`: what to save, when, and what to keep.

Field names follow Orbax's `CheckpointManagerOptions` so that users can carry their
configuration over. Every value is checked at construction, and a bad one raises
`InvalidOptionError` naming the field, before any file is touched.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

from checkpointing._checks import check_int, check_positive_number, check_steps
from checkpointing.errors import InvalidOptionError
from checkpointing.format.naming import StepNaming
from checkpointing.policies.retention import (
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    RetentionPolicy,
)
from checkpointing.policies.save import (
    AnyOf,
    AtSteps,
    EveryNSeconds,
    EveryNSteps,
    InitialSave,
    OnPreemption,
    SavePolicy,
)
from checkpointing.preemption import DEFAULT_SIGNALS


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointManagerOptions:
    """Configuration of a `CheckpointManager`. All fields are optional.

    A save happens when any configured save rule says so. A checkpoint survives if any
    retention rule keeps it; deletion runs after a commit.

    Attributes:
        save_interval_steps: Save when ``step % n == 0``. When none of this,
            ``save_on_steps`` and ``save_interval_secs`` is set, every ``save()`` call
            saves (as if this were 1), whatever the initial and preemption rules say.
        save_on_steps: Explicit steps to save at.
        save_interval_secs: Save when this long has passed since the newest save began
            (an async save still being written counts), or nothing was saved yet
            (seconds or timedelta; stored as seconds).
        save_on_initial: Also save the first step seen when the directory has no
            checkpoint.
        save_on_preemption: Install a handler of ``preemption_signals`` (chained to any
            existing one); after a signal, ``should_save`` says yes and
            ``reached_preemption`` is True.
        preemption_signals: The signals that mean preemption (SIGTERM and SIGUSR1).
        save_policy: A policy object used instead of the step, time and initial-save
            fields (``save_on_preemption`` still applies).
        max_to_keep: Keep the newest N (or, with a best rule, the best N). None keeps
            all.
        keep_period: With max_to_keep, also keep every step divisible by this forever.
        keep_time_interval: With max_to_keep, also keep one checkpoint per interval
            (seconds or timedelta; stored as seconds).
        best_fn: A best rule: rank checkpoints by this function of their metrics.
        best_metric: A best rule: rank checkpoints by this metric (a key, or a
            ``"/"``-separated path into nested metrics); set this or ``best_fn``.
        best_mode: Whether the best rule's highest ("max", the default, as Orbax's) or
            lowest ("min": losses) value is best.
        keep_checkpoints_without_metrics: With a best rule, never delete unranked ones.
        always_keep_latest: Never delete the newest checkpoint (the resume point). False
            reproduces Orbax, which may delete it when it ranks outside the best N.
        retention_policy: A policy object used instead of the retention fields.
        step_prefix: Step directory names are ``<prefix>_<step>`` (``step_00000100``);
            None names them by the bare number.
        step_format_fixed_length: The digits the step is zero-padded to in new names
            (None: no padding).
        step_naming: A `StepNaming` object used instead of the two fields above.
        create: Create the directory if missing.
        cleanup_tmp_directories: Remove leftovers of crashed saves at start-up.
        read_only: Never write, delete or lock (evaluation jobs).
        verify_checksums: Check every file's checksum on restore (sizes are always
            checked).
        enable_async_checkpointing: ``save()`` returns after a snapshot; writing happens
            in the background.
        async_timeout_secs: Fail a background save that takes longer than this.
        incremental: Write only the tensors that changed since this process's previous
            save; the step refers to the earlier step's file for the others (a frozen
            base model is stored once), and retention keeps a step while a kept step
            reads from it. The first save of a process is complete; a ``remote=``
            mirror carries such steps with the steps they read (docs/format.md).
        coordination_timeout_secs: In a torch.distributed job, how long a process waits
            for the others at a collective step (save, restore) before failing with an
            error that names the missing ranks.
        writer_lease_secs: On an object store, the writer's lease (its lock) lasts this
            long unrenewed; it is renewed every third of it. A writer that died keeps a
            new one waiting at most this long; one cut off from the store for longer may
            be taken over (it then stops writing, with `DirectoryLockedError`).

    Raises:
        InvalidOptionError: A field has a value that cannot work (the message names
            it); raised at construction, before any file is touched.
    """

    save_interval_steps: int | None = None
    save_on_steps: Collection[int] | None = None
    save_interval_secs: float | datetime.timedelta | None = None
    save_on_initial: bool = False
    save_on_preemption: bool = False
    preemption_signals: tuple[int, ...] = DEFAULT_SIGNALS
    save_policy: SavePolicy | None = None

    max_to_keep: int | None = None
    keep_period: int | None = None
    keep_time_interval: float | datetime.timedelta | None = None
    best_fn: Callable[[Mapping[str, Any]], float] | None = None
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "max"
    keep_checkpoints_without_metrics: bool = True
    always_keep_latest: bool = True
    retention_policy: RetentionPolicy | None = None

    step_prefix: str | None = "step"
    step_format_fixed_length: int | None = 8
    step_naming: StepNaming | None = None
    create: bool = True
    cleanup_tmp_directories: bool = True
    read_only: bool = False
    verify_checksums: bool = True
    enable_async_checkpointing: bool = True
    async_timeout_secs: float | None = None
    incremental: bool = False
    coordination_timeout_secs: float = 600.0
    writer_lease_secs: float = 30.0

    def __post_init__(self) -> None:
        check_int("save_interval_steps", self.save_interval_steps, low=1, optional=True)
        check_int("max_to_keep", self.max_to_keep, low=0, optional=True)
        check_int("keep_period", self.keep_period, low=1, optional=True)
        check_int("step_format_fixed_length", self.step_format_fixed_length, low=1, optional=True)
        for field in ("save_interval_secs", "keep_time_interval"):  # like Orbax
            if getattr(self, field) is not None:
                object.__setattr__(self, field, _seconds(getattr(self, field)))
        check_positive_number("save_interval_secs", self.save_interval_secs, optional=True)
        check_positive_number("async_timeout_secs", self.async_timeout_secs, optional=True)
        check_positive_number("coordination_timeout_secs", self.coordination_timeout_secs)
        check_positive_number("writer_lease_secs", self.writer_lease_secs)
        check_positive_number("keep_time_interval", self.keep_time_interval, optional=True)
        if self.save_on_steps is not None:
            steps = check_steps("save_on_steps", self.save_on_steps)
            object.__setattr__(self, "save_on_steps", steps)
        if self.best_mode not in ("min", "max"):
            raise InvalidOptionError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.best_fn is not None and self.best_metric is not None:
            raise InvalidOptionError("set best_fn or best_metric, not both")
        if self.best_fn is not None and not callable(self.best_fn):
            raise InvalidOptionError(f"best_fn must be callable, got {self.best_fn!r}")
        if self.best_metric is not None and (
            not isinstance(self.best_metric, str) or not self.best_metric.strip("/")
        ):
            raise InvalidOptionError(
                f"best_metric must be a '/'-separated key path, got {self.best_metric!r}"
            )
        if self.step_prefix is not None and (
            not isinstance(self.step_prefix, str)
            or not self.step_prefix
            or "/" in self.step_prefix
            or self.step_prefix.startswith(".")
        ):
            raise InvalidOptionError(
                f"step_prefix must be a non-empty name without '/' or a leading '.', "
                f"got {self.step_prefix!r}"
            )
        for field, kind, other in (
            ("save_policy", SavePolicy, "retention_policy"),
            ("retention_policy", RetentionPolicy, "save_policy"),
        ):
            policy = getattr(self, field)
            if policy is not None and not isinstance(policy, kind):
                hint = (
                    f", which is a {other.replace('_', ' ')}: pass it as {other}="
                    if isinstance(policy, SavePolicy | RetentionPolicy)
                    else ""
                )
                raise InvalidOptionError(
                    f"{field} takes a {kind.__name__} (with "
                    f"{'should_save' if kind is SavePolicy else 'keep'}), got {policy!r}{hint}"
                )
        if not all(isinstance(s, int) for s in self.preemption_signals):
            raise InvalidOptionError("preemption_signals must be signal numbers")

    @property
    def has_best_rule(self) -> bool:
        """Whether ``best_fn`` or ``best_metric`` is set (retention ranks by metrics)."""
        return self.best_fn is not None or self.best_metric is not None


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
        rules.append(EveryNSeconds(_seconds(options.save_interval_secs)))
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


def retention_policy_from_options(options: CheckpointManagerOptions) -> RetentionPolicy | None:
    """Build the retention policy the option fields describe, with Orbax's semantics.

    Nothing is deleted unless ``max_to_keep`` is set (None is returned: keep all). It then
    counts the newest checkpoints, or with ``best_fn``/``best_metric`` the best ones;
    ``keep_period`` and ``keep_time_interval`` keep more on top. ``retention_policy``
    replaces all of these fields.
    """
    if options.retention_policy is not None:
        return options.retention_policy
    n = options.max_to_keep
    if n is None:
        return None
    metric = options.best_fn if options.best_fn is not None else options.best_metric
    rules: list[RetentionPolicy] = [
        KeepLatest(n)
        if metric is None
        else KeepBest(
            n,
            metric,
            mode=options.best_mode,
            keep_without_metrics=options.keep_checkpoints_without_metrics,
        )
    ]
    if options.keep_period is not None:
        rules.append(KeepEveryNSteps(options.keep_period))
    if options.keep_time_interval is not None:
        rules.append(KeepEveryNSeconds(_seconds(options.keep_time_interval)))
    return rules[0] if len(rules) == 1 else KeepAnyOf(*rules)


def _seconds(interval: float | datetime.timedelta) -> float:
    """An interval given as seconds or a timedelta (both are accepted, as by Orbax)."""
    if isinstance(interval, datetime.timedelta):
        return interval.total_seconds()
    return interval
