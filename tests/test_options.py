"""`CheckpointManagerOptions`: every value checked at construction, and the policies the
fields describe."""

from __future__ import annotations

import datetime
import signal
from collections.abc import Mapping
from typing import Any

import pytest
from clock import FakeClock, run

from checkpointing.errors import InvalidOptionError
from checkpointing.options import (
    CheckpointManagerOptions,
    configured_save_rules,
    retention_policy_from_options,
    save_policy_from_options,
)
from checkpointing.policies import (
    AnyOf,
    AtSteps,
    EveryNSeconds,
    EveryNSteps,
    InitialSave,
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    KeepSteps,
    OnPreemption,
    RetentionPolicy,
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("save_interval_steps", 0),
        ("max_to_keep", -1),
        ("keep_period", 1.5),
        ("best_mode", "median"),
        ("save_on_steps", [1, -2]),
        ("step_prefix", "a/b"),
        ("save_interval_secs", float("nan")),
    ],
)
def test_invalid_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidOptionError, match=field):
        CheckpointManagerOptions(**{field: value})  # type: ignore[arg-type]


def test_a_timedelta_interval_is_stored_as_seconds() -> None:
    options = CheckpointManagerOptions(keep_time_interval=datetime.timedelta(minutes=2))
    assert options.keep_time_interval == 120.0


def test_conflicting_and_malformed_fields_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="best_fn or best_metric"):
        CheckpointManagerOptions(best_fn=lambda m: 0.0, best_metric="loss")
    with pytest.raises(InvalidOptionError, match="preemption_signals"):
        CheckpointManagerOptions(preemption_signals=("TERM",))  # type: ignore[arg-type]
    assert CheckpointManagerOptions(save_on_steps=[3, 1]).save_on_steps == frozenset({1, 3})
    assert signal.SIGTERM in CheckpointManagerOptions().preemption_signals


def test_configured_rules_leave_out_the_defaults() -> None:
    assert configured_save_rules(CheckpointManagerOptions()) == []
    options = CheckpointManagerOptions(save_interval_secs=5, save_on_initial=True)
    assert configured_save_rules(options) == [EveryNSeconds(5), InitialSave()]


def steps_saved(options: CheckpointManagerOptions, steps: range, **kw: object) -> list[int]:
    return run(save_policy_from_options(options), steps, FakeClock(), **kw)  # type: ignore[arg-type]


class TestSavePolicyFromOptions:
    def test_default_saves_every_step(self) -> None:
        assert steps_saved(CheckpointManagerOptions(), range(5)) == [0, 1, 2, 3, 4]
        assert save_policy_from_options(CheckpointManagerOptions()) == EveryNSteps(1)

    def test_interval_steps(self) -> None:
        opts = CheckpointManagerOptions(save_interval_steps=4)
        assert steps_saved(opts, range(13)) == [0, 4, 8, 12]

    def test_interval_and_listed_steps(self) -> None:
        opts = CheckpointManagerOptions(save_interval_steps=10, save_on_steps=[3, 15])
        assert steps_saved(opts, range(25)) == [0, 3, 10, 15, 20]

    def test_listed_steps_alone_replace_the_every_step_default(self) -> None:
        opts = CheckpointManagerOptions(save_on_steps=[2, 5])
        assert steps_saved(opts, range(10)) == [2, 5]

    def test_interval_secs(self) -> None:
        opts = CheckpointManagerOptions(save_interval_secs=10)
        assert steps_saved(opts, range(1, 30), secs_per_step=3.0) == [1, 5, 9, 13, 17, 21, 25, 29]

    def test_initial_save(self) -> None:
        opts = CheckpointManagerOptions(save_interval_steps=10, save_on_initial=True)
        assert steps_saved(opts, range(7, 31)) == [7, 10, 20, 30]

    def test_empty_listed_steps_with_preemption_saves_only_on_preemption(self) -> None:
        opts = CheckpointManagerOptions(save_on_steps=(), save_on_preemption=True)
        assert steps_saved(opts, range(10), preempt_at=6) == [6, 7, 8, 9]

    def test_preemption_added_to_rules(self) -> None:
        opts = CheckpointManagerOptions(save_interval_steps=100, save_on_preemption=True)
        assert save_policy_from_options(opts) == AnyOf(EveryNSteps(100), OnPreemption())
        assert steps_saved(opts, range(150), preempt_at=42)[:3] == [0, 42, 43]

    def test_save_policy_replaces_fields(self) -> None:
        opts = CheckpointManagerOptions(
            save_policy=AtSteps([5]), save_interval_steps=2, save_on_initial=True
        )
        assert save_policy_from_options(opts) == AtSteps([5])

    def test_save_policy_still_ored_with_preemption(self) -> None:
        opts = CheckpointManagerOptions(save_policy=AtSteps([5]), save_on_preemption=True)
        assert save_policy_from_options(opts) == AnyOf(AtSteps([5]), OnPreemption())


def policy_for(**fields: Any) -> RetentionPolicy | None:
    return retention_policy_from_options(CheckpointManagerOptions(**fields))


def neg(m: Mapping[str, Any]) -> float:
    return -float(m["x"])


class TestRetentionPolicyFromOptions:
    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({}, None),
            ({"keep_period": 10, "keep_time_interval": 60.0}, None),
            ({"best_metric": "loss", "best_mode": "min"}, None),
            ({"max_to_keep": 3}, KeepLatest(3)),
            ({"max_to_keep": 0}, KeepLatest(0)),
            (
                {"max_to_keep": 3, "keep_period": 1000},
                KeepAnyOf(KeepLatest(3), KeepEveryNSteps(1000)),
            ),
            (
                {"max_to_keep": 3, "keep_time_interval": datetime.timedelta(hours=1)},
                KeepAnyOf(KeepLatest(3), KeepEveryNSeconds(3600.0)),
            ),
            (
                {
                    "max_to_keep": 2,
                    "best_metric": "loss",
                    "best_mode": "min",
                    "keep_checkpoints_without_metrics": False,
                },
                KeepBest(2, "loss", "min", keep_without_metrics=False),
            ),
            (
                {"max_to_keep": 2, "best_fn": neg, "keep_period": 5, "keep_time_interval": 9},
                KeepAnyOf(KeepBest(2, neg), KeepEveryNSteps(5), KeepEveryNSeconds(9)),
            ),
        ],
    )
    def test_mapping(self, fields: dict[str, Any], expected: RetentionPolicy | None) -> None:
        assert policy_for(**fields) == expected

    def test_retention_policy_replaces_fields(self) -> None:
        custom = KeepSteps([1])
        assert policy_for(retention_policy=custom, max_to_keep=3, keep_period=2) is custom
