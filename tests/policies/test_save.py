"""Save rules: each rule alone, combinations, and a fake-clock run."""

from __future__ import annotations

import pytest
from clock import FakeClock, run
from hypothesis import given, strategies as st

from checkpointing.errors import InvalidOptionError
from checkpointing.policies import (
    AnyOf,
    AtSteps,
    Continuous,
    EveryNSeconds,
    EveryNSteps,
    InitialSave,
    OnPreemption,
    SaveContext,
    SavePolicy,
    decide_save,
)


def ctx(
    step: int,
    latest_step: int | None = None,
    last_save_time: float | None = None,
    now: float = 0.0,
    *,
    preempted: bool = False,
) -> SaveContext:
    return SaveContext(step, latest_step, last_save_time, now, preempted)


class TestEveryNSteps:
    @pytest.mark.parametrize(("step", "due"), [(0, True), (1, False), (9, False), (10, True)])
    def test_multiples(self, step: int, due: bool) -> None:
        assert EveryNSteps(10).should_save(ctx(step)) is due

    def test_one_saves_every_step(self) -> None:
        assert all(EveryNSteps(1).should_save(ctx(s)) for s in range(20))

    @pytest.mark.parametrize("n", [0, -1, 1.5, True, "2", None])
    def test_rejects_bad_n(self, n: object) -> None:
        with pytest.raises(InvalidOptionError, match="EveryNSteps"):
            EveryNSteps(n)  # type: ignore[arg-type]


class TestContinuous:
    def test_saves_whenever_no_save_is_being_written(self) -> None:
        rule = Continuous()
        assert rule.should_save(ctx(5))
        assert rule.should_save(ctx(5, latest_step=4, last_save_time=9.0, now=9.0))
        busy = SaveContext(5, 4, 9.0, 9.0, saving=True)
        assert not rule.should_save(busy)

    def test_min_interval(self) -> None:
        rule = Continuous(min_interval_secs=60)
        assert not rule.should_save(ctx(5, latest_step=4, last_save_time=0.0, now=59.0))
        assert rule.should_save(ctx(5, latest_step=4, last_save_time=0.0, now=60.0))

    @pytest.mark.parametrize("secs", [-1, float("inf"), "1"])
    def test_rejects_bad_interval(self, secs: object) -> None:
        with pytest.raises(InvalidOptionError, match="Continuous"):
            Continuous(secs)  # type: ignore[arg-type]


class TestAtSteps:
    def test_membership(self) -> None:
        policy = AtSteps([3, 7, 7, 100])
        assert [s for s in range(120) if policy.should_save(ctx(s))] == [3, 7, 100]
        assert policy.steps == frozenset({3, 7, 100})

    def test_empty_never_saves(self) -> None:
        assert not any(AtSteps(()).should_save(ctx(s)) for s in range(10))

    @pytest.mark.parametrize("steps", [[-1], [1.0], "12", [True], [None]])
    def test_rejects_bad_steps(self, steps: object) -> None:
        with pytest.raises(InvalidOptionError, match="AtSteps"):
            AtSteps(steps)  # type: ignore[arg-type]


class TestEveryNSeconds:
    def test_due_when_never_saved(self) -> None:
        assert EveryNSeconds(60).should_save(ctx(5, None, None, now=0.0))

    @pytest.mark.parametrize(("now", "due"), [(100.0, False), (159.9, False), (160.0, True)])
    def test_elapsed_since_last_save(self, now: float, due: bool) -> None:
        assert EveryNSeconds(60).should_save(ctx(5, 4, 100.0, now=now)) is due

    def test_clock_behind_last_save_waits(self) -> None:
        assert not EveryNSeconds(60).should_save(ctx(5, 4, 100.0, now=50.0))

    @pytest.mark.parametrize("secs", [0, -5, float("inf"), float("nan"), True, "60"])
    def test_rejects_bad_secs(self, secs: object) -> None:
        with pytest.raises(InvalidOptionError, match="EveryNSeconds"):
            EveryNSeconds(secs)  # type: ignore[arg-type]

    def test_fake_clock_run(self) -> None:
        # 7 s per step, 30 s interval: due at t=0, 35 (5 steps), 70, ...
        saved = run(EveryNSeconds(30), range(20), FakeClock(0.0), secs_per_step=7.0)
        assert saved == [0, 5, 10, 15]


class TestSimpleRules:
    def test_initial_save_only_on_empty_directory(self) -> None:
        assert InitialSave().should_save(ctx(17, None))
        assert not InitialSave().should_save(ctx(17, 3))

    def test_on_preemption(self) -> None:
        assert OnPreemption().should_save(ctx(5, 3, preempted=True))
        assert not OnPreemption().should_save(ctx(5, 3))

    def test_rules_are_save_policies(self) -> None:
        rules: list[SavePolicy] = [
            EveryNSteps(2),
            AtSteps([1]),
            EveryNSeconds(1),
            InitialSave(),
            OnPreemption(),
        ]
        assert all(isinstance(rule, SavePolicy) for rule in [*rules, AnyOf(*rules)])


class TestAnyOf:
    def test_or_of_rules(self) -> None:
        policy = AnyOf(EveryNSteps(10), AtSteps([3]))
        assert [s for s in range(25) if policy.should_save(ctx(s))] == [0, 3, 10, 20]

    def test_rejects_empty(self) -> None:
        with pytest.raises(InvalidOptionError, match="at least one"):
            AnyOf()

    def test_rejects_non_policy(self) -> None:
        with pytest.raises(InvalidOptionError, match="should_save"):
            AnyOf(EveryNSteps(2), lambda c: True)  # type: ignore[arg-type]

    def test_custom_policy_object(self) -> None:
        class OddSteps:
            def should_save(self, ctx: SaveContext) -> bool:
                return ctx.step % 2 == 1

        assert AnyOf(OddSteps(), AtSteps([4])).should_save(ctx(4))


class TestDecideSave:
    @pytest.mark.parametrize("step", [3, 5])
    def test_never_at_or_below_latest(self, step: int) -> None:
        always = AnyOf(EveryNSteps(1), OnPreemption(), InitialSave())
        assert not decide_save(always, ctx(step, latest_step=5, preempted=True))

    def test_delegates_above_latest(self) -> None:
        assert decide_save(EveryNSteps(2), ctx(6, latest_step=5))
        assert not decide_save(EveryNSteps(2), ctx(7, latest_step=5))

    def test_delegates_on_empty_directory(self) -> None:
        assert decide_save(EveryNSteps(2), ctx(0))
        assert not decide_save(EveryNSteps(2), ctx(1))

    @given(
        st.integers(0, 10**6),
        st.none() | st.integers(0, 10**6),
        st.booleans(),
    )
    def test_property(self, step: int, latest: int | None, preempted: bool) -> None:
        policy = AnyOf(EveryNSteps(1), OnPreemption())
        expected = latest is None or step > latest
        assert decide_save(policy, ctx(step, latest, preempted=preempted)) is expected
