"""Retention rules: each rule alone, combinations, options mapping, Orbax-compatible mode,
and property tests over random save histories with restarts."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from checkpointing.errors import InvalidOptionError
from checkpointing.options import CheckpointManagerOptions, retention_policy_from_options
from checkpointing.policies import (
    CheckpointInfo,
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    KeepNewerThan,
    KeepSteps,
    RetentionDecision,
    RetentionPolicy,
    decide_retention,
)

Metrics = Mapping[str, Any] | None


def history(
    steps: Sequence[int],
    times: Sequence[float] | None = None,
    metrics: Sequence[Metrics] | None = None,
) -> list[CheckpointInfo]:
    """Checkpoints at ``steps``; commit time defaults to the step number."""
    times = times if times is not None else [float(s) for s in steps]
    metrics = metrics if metrics is not None else [None] * len(steps)
    return [CheckpointInfo(s, t, m) for s, t, m in zip(steps, times, metrics, strict=True)]


def kept(policy: RetentionPolicy, checkpoints: Sequence[CheckpointInfo]) -> dict[int, Any]:
    return dict(policy.keep(checkpoints, 0.0))


def survivors(decision: RetentionDecision) -> set[int]:
    return set(decision.keep)


class TestKeepLatest:
    def test_newest_n(self) -> None:
        assert kept(KeepLatest(3), history(range(1, 6))) == {
            3: ("latest 3",),
            4: ("latest 3",),
            5: ("latest 3",),
        }

    def test_more_than_present(self) -> None:
        assert set(kept(KeepLatest(10), history([1, 2]))) == {1, 2}

    def test_zero_keeps_nothing(self) -> None:
        assert kept(KeepLatest(0), history([1, 2])) == {}

    @pytest.mark.parametrize("n", [-1, 1.5, True, None])
    def test_rejects_bad_n(self, n: object) -> None:
        with pytest.raises(InvalidOptionError, match="KeepLatest"):
            KeepLatest(n)  # type: ignore[arg-type]


class TestKeepEveryNSteps:
    def test_multiples(self) -> None:
        result = kept(KeepEveryNSteps(10), history([0, 5, 10, 15, 20, 21]))
        assert result == {0: ("every 10 steps",), 10: ("every 10 steps",), 20: ("every 10 steps",)}

    @pytest.mark.parametrize("n", [0, -3, 2.0, False])
    def test_rejects_bad_n(self, n: object) -> None:
        with pytest.raises(InvalidOptionError, match="KeepEveryNSteps"):
            KeepEveryNSteps(n)  # type: ignore[arg-type]

    def test_closest_to_each_multiple(self) -> None:
        #  nearest multiple:  0 | 100          | 200       | 300     | 400
        #  steps:             3 | 97 104 149   | 151 198   | 260 340 | 360
        result = kept(
            KeepEveryNSteps(100, exact=False), history([3, 97, 104, 149, 151, 198, 260, 340, 360])
        )
        assert set(result) == {3, 97, 198, 260, 360}  # 260 and 340 tie for 300: the earlier
        assert result[97] == ("closest to every 100 steps",)

    def test_own_cap_keeps_the_newest(self) -> None:
        assert set(kept(KeepEveryNSteps(10, max_to_keep=2), history([10, 20, 25, 30]))) == {
            20,
            30,
        }

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.integers(0, 500), unique=True, max_size=30).map(sorted),
        st.integers(1, 60),
        st.booleans(),
    )
    def test_deleting_the_others_changes_nothing(
        self, steps: list[int], n: int, exact: bool
    ) -> None:
        rule = KeepEveryNSteps(n, exact=exact)
        first = kept(rule, history(steps))
        assert kept(rule, history(sorted(first))) == first
        if not exact:  # one per multiple, the closest to it
            nearest = {s: (s + n // 2) // n * n for s in steps}
            assert len({nearest[s] for s in first}) == len(first) == len(set(nearest.values()))
            for step in first:
                rivals = [s for s in steps if nearest[s] == nearest[step]]
                assert all(abs(s - nearest[s]) >= abs(step - nearest[step]) for s in rivals)


class TestKeepNewerThan:
    def test_keeps_what_is_younger(self) -> None:
        checkpoints = history([1, 2, 3], times=[0.0, 50.0, 95.0])
        assert set(KeepNewerThan(50.0).keep(checkpoints, 100.0)) == {3}
        assert set(KeepNewerThan(51.0).keep(checkpoints, 100.0)) == {2, 3}

    @pytest.mark.parametrize("secs", [0, -1.0, float("nan"), "60"])
    def test_rejects_bad_secs(self, secs: object) -> None:
        with pytest.raises(InvalidOptionError, match="KeepNewerThan"):
            KeepNewerThan(secs)  # type: ignore[arg-type]


class TestKeepEveryNSeconds:
    #   step:   1     2     3     4     5     6     7      8
    #   time:   0  1000  2000  3600  3700  7100  7300  20000
    #   kept:   *                 *                 *      *
    TIMES = (0.0, 1000.0, 2000.0, 3600.0, 3700.0, 7100.0, 7300.0, 20000.0)

    def test_one_per_interval_oldest_first(self) -> None:
        result = kept(KeepEveryNSeconds(3600), history(range(1, 9), self.TIMES))
        assert result == dict.fromkeys([1, 4, 7, 8], ("one per 3600s",))

    def test_unchanged_when_the_others_are_gone(self) -> None:
        cps = history(range(1, 9), self.TIMES)
        policy = KeepEveryNSeconds(3600)
        rest = [c for c in cps if c.step in kept(policy, cps)]
        assert kept(policy, rest) == kept(policy, cps)

    def test_fractional_label(self) -> None:
        assert kept(KeepEveryNSeconds(1.5), history([1])) == {1: ("one per 1.5s",)}

    @pytest.mark.parametrize("secs", [0, -1.0, math.inf, math.nan, True])
    def test_rejects_bad_secs(self, secs: object) -> None:
        with pytest.raises(InvalidOptionError, match="KeepEveryNSeconds"):
            KeepEveryNSeconds(secs)  # type: ignore[arg-type]


def acc(*values: float | None) -> list[Metrics]:
    return [None if v is None else {"acc": v} for v in values]


class TestKeepBest:
    def test_max(self) -> None:
        cps = history(range(1, 6), metrics=acc(0.5, 0.8, 0.7, 0.9, 0.1))
        assert kept(KeepBest(2, "acc"), cps) == dict.fromkeys([2, 4], ("best 2 by acc (max)",))

    def test_min_nested_path(self) -> None:
        losses = [3.0, 1.0, 2.0, 0.5]
        cps = history(range(1, 5), metrics=[{"eval": {"loss": v}} for v in losses])
        result = kept(KeepBest(2, "/eval/loss/", "min"), cps)
        assert result == dict.fromkeys([2, 4], ("best 2 by eval/loss (min)",))

    @pytest.mark.parametrize("mode", ["min", "max"])
    def test_ties_newer_wins(self, mode: Literal["min", "max"]) -> None:
        cps = history(range(1, 5), metrics=acc(0.5, 0.5, 0.5, 0.5))
        assert set(kept(KeepBest(2, "acc", mode), cps)) == {3, 4}

    @pytest.mark.parametrize(
        "metrics",
        [
            None,
            {},
            {"loss": 1.0},
            {"acc": None},
            {"acc": "0.5"},
            {"acc": "nan"},  # how the commit record stores NaN
            {"acc": math.nan},
            {"acc": math.inf},
            {"acc": True},
            {"acc": [0.5]},
        ],
    )
    def test_unranked(self, metrics: Metrics) -> None:
        cps = history([1, 2], metrics=[{"acc": 0.1}, metrics])
        assert kept(KeepBest(1, "acc"), cps) == {1: ("best 1 by acc (max)",), 2: ("no metrics",)}

    def test_path_through_a_number_is_unranked(self) -> None:
        cps = history([1], metrics=[{"eval": 1.0}])
        assert kept(KeepBest(1, "eval/loss"), cps) == {1: ("no metrics",)}

    def test_numpy_scalars_rank(self) -> None:
        cps = history([1, 2], metrics=[{"acc": np.float32(0.9)}, {"acc": np.int64(0)}])
        assert set(kept(KeepBest(1, "acc"), cps)) == {1}

    def test_without_metrics_fill_free_slots_newest_first(self) -> None:
        cps = history(range(1, 5), metrics=acc(None, 0.5, None, None))
        result = kept(KeepBest(3, "acc", keep_without_metrics=False), cps)
        filler = ("best 3 by acc (max): unranked, free slot",)
        assert result == {2: ("best 3 by acc (max)",), 3: filler, 4: filler}

    def test_without_metrics_dropped_when_ranked_fill_n(self) -> None:
        cps = history(range(1, 6), metrics=acc(0.9, None, 0.1, 0.5, None))
        assert set(kept(KeepBest(2, "acc", keep_without_metrics=False), cps)) == {1, 4}

    def test_zero_keeps_only_unranked(self) -> None:
        cps = history(range(1, 4), metrics=acc(0.9, None, 0.1))
        assert kept(KeepBest(0, "acc"), cps) == {2: ("no metrics",)}
        assert kept(KeepBest(0, "acc", keep_without_metrics=False), cps) == {}

    def test_function(self) -> None:
        def neg_loss(m: Mapping[str, Any]) -> float:
            return -float(m["loss"])

        cps = history(range(1, 4), metrics=[{"loss": 3}, {"loss": 1}, {"loss": 2}])
        assert kept(KeepBest(1, neg_loss), cps) == {2: ("best 1 by neg_loss (max)",)}
        assert kept(KeepBest(1, lambda m: m["loss"], "min"), cps) == {
            2: ("best 1 by best_fn (min)",)
        }

    def test_function_nan_is_unranked_and_none_metrics_skip_it(self) -> None:
        calls: list[Metrics] = []

        def score(m: Mapping[str, Any]) -> float:
            calls.append(m)
            return float(m.get("acc", math.nan))

        cps = history(range(1, 4), metrics=[{"acc": 0.2}, {}, None])
        result = kept(KeepBest(1, score, keep_without_metrics=False), cps)
        assert result == {1: ("best 1 by score (max)",)}
        assert calls == [{"acc": 0.2}, {}]

    @pytest.mark.parametrize(
        ("args", "match"),
        [
            ((-1, "acc"), "KeepBest n must be"),
            ((1, ""), "key path"),
            ((1, "//"), "key path"),
            ((1, 3), "key path or a function"),
            ((1, "acc", "avg"), "'min' or 'max'"),
        ],
    )
    def test_rejects_bad_arguments(self, args: tuple[Any, ...], match: str) -> None:
        with pytest.raises(InvalidOptionError, match=match):
            KeepBest(*args)


class TestKeepSteps:
    def test_listed(self) -> None:
        assert kept(KeepSteps([3, 7, 99]), history(range(10))) == dict.fromkeys(
            [3, 7], ("listed steps",)
        )

    @pytest.mark.parametrize("steps", [[-1], "3", [2.0]])
    def test_rejects_bad_steps(self, steps: object) -> None:
        with pytest.raises(InvalidOptionError, match="KeepSteps"):
            KeepSteps(steps)  # type: ignore[arg-type]


class TestKeepAnyOf:
    def test_union_with_all_reasons(self) -> None:
        policy = KeepAnyOf(KeepLatest(2), KeepEveryNSteps(5), KeepSteps([5]))
        assert kept(policy, history(range(1, 11))) == {
            5: ("every 5 steps", "listed steps"),
            9: ("latest 2",),
            10: ("latest 2", "every 5 steps"),
        }

    def test_rejects_empty_and_non_policies(self) -> None:
        with pytest.raises(InvalidOptionError, match="at least one"):
            KeepAnyOf()
        with pytest.raises(InvalidOptionError, match="with keep"):
            KeepAnyOf(KeepLatest(1), 3)  # type: ignore[arg-type]

    def test_all_rules_are_retention_policies(self) -> None:
        rules: list[object] = [
            KeepLatest(1),
            KeepEveryNSteps(1),
            KeepEveryNSeconds(1),
            KeepBest(1, "a"),
            KeepSteps([1]),
        ]
        assert all(isinstance(r, RetentionPolicy) for r in rules)


class TestDecideRetention:
    def test_no_policy_keeps_everything(self) -> None:
        decision = decide_retention(history([1, 2]), None, now=0.0)
        assert decision == RetentionDecision(
            keep={1: ("max_to_keep=None",), 2: ("max_to_keep=None", "latest")}, delete=()
        )

    def test_empty(self) -> None:
        assert decide_retention([], KeepLatest(1), now=0.0) == RetentionDecision({}, ())

    def test_newest_kept_even_when_ranked_out(self) -> None:
        cps = history(range(1, 4), metrics=acc(0.9, 0.8, 0.1))
        decision = decide_retention(cps, KeepBest(1, "acc"), now=0.0)
        assert decision.keep == {1: ("best 1 by acc (max)",), 3: ("latest",)}
        assert decision.delete == (2,)
        orbax = decide_retention(cps, KeepBest(1, "acc"), now=0.0, always_keep_latest=False)
        assert orbax.delete == (2, 3)

    def test_protected_and_in_progress(self) -> None:
        decision = decide_retention(
            history(range(1, 6)),
            KeepLatest(1),
            now=0.0,
            protected=[2, 5, 42],
            in_progress=[3, 43],
        )
        assert decision.keep == {
            2: ("protected",),
            3: ("in progress",),
            5: ("latest 1", "latest", "protected"),
        }
        assert decision.delete == (1, 4)

    def test_unsorted_input(self) -> None:
        decision = decide_retention(history([5, 1, 3, 2, 4]), KeepLatest(2), now=0.0)
        assert list(decision.keep) == [4, 5]
        assert decision.delete == (1, 2, 3)

    def test_duplicate_steps_rejected(self) -> None:
        with pytest.raises(InvalidOptionError, match=r"steps \[2\] appear twice"):
            decide_retention(history([1, 2, 2]), KeepLatest(1), now=0.0)

    def test_policy_keeping_unknown_step_rejected(self) -> None:
        class Confused:
            def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Any:
                return {99: ("why not",)}

        with pytest.raises(InvalidOptionError, match="step 99"):
            decide_retention(history([1]), Confused(), now=0.0)

    def test_custom_policy_with_clock_and_empty_reasons(self) -> None:
        class YoungerThan:
            def __init__(self, secs: float) -> None:
                self.secs = secs

            def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> Any:
                return {c.step: ("young",) if now - c.time < self.secs else () for c in checkpoints}

        cps = history([1, 2, 3], times=[0.0, 50.0, 90.0])
        decision = decide_retention(cps, YoungerThan(60), now=100.0, always_keep_latest=False)
        assert decision == RetentionDecision(keep={2: ("young",), 3: ("young",)}, delete=(1,))
        later = decide_retention(cps, YoungerThan(60), now=155.0, always_keep_latest=False)
        assert later.delete == (1, 2, 3)

    def test_a_kept_step_keeps_the_steps_holding_its_tensors(self) -> None:
        # 300 reads tensors of 100 and 200; 200 reads some of 100 (e.g. an older origin).
        refs = {200: {100}, 300: {100, 200}, 400: {300}}
        decision = decide_retention(history([100, 200, 300, 400]), KeepLatest(1), now=0.0,
                                    references=refs)
        assert decision.keep == {
            400: ("latest 1", "latest"),
            300: ("holds tensors of step 400",),
            200: ("holds tensors of step 300",),
            100: ("holds tensors of step 200", "holds tensors of step 300"),
        }
        assert decision.delete == ()
        alone = decide_retention(history([100, 200, 300]), KeepLatest(1), now=0.0,
                                 references={300: {200}, 999: {100}})
        assert alone.delete == (100,)  # 999 is no checkpoint: its references count for nothing


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=12, unique=True),
    st.integers(0, 4),
    st.data(),
)
def test_references_close_over_what_survives(steps: list[int], n: int, data: Any) -> None:
    """What survives is exactly the policy's choice plus everything it reads, transitively."""
    steps.sort()
    refs = {
        s: set(data.draw(st.lists(st.sampled_from(steps[:i]), max_size=3))) if i else set()
        for i, s in enumerate(steps)
    }
    with_refs = decide_retention(history(steps), KeepLatest(n), now=0.0, references=refs)
    plain = decide_retention(history(steps), KeepLatest(n), now=0.0)
    expected, todo = set(plain.keep), list(plain.keep)
    while todo:
        for origin in refs[todo.pop()] - expected:
            expected.add(origin)
            todo.append(origin)
    assert set(with_refs.keep) == expected
    assert set(with_refs.delete) == set(steps) - expected
    for step in with_refs.keep:
        assert refs[step] <= set(with_refs.keep)



def orbax_survivors(
    steps: Sequence[int],
    *,
    times: Sequence[float] | None = None,
    metrics: Sequence[Metrics] | None = None,
    **fields: Any,
) -> set[int]:
    """Save ``steps`` one by one, deleting after each commit as Orbax does."""
    options = CheckpointManagerOptions(always_keep_latest=False, **fields)
    policy = retention_policy_from_options(options)
    all_cps = history(steps, times, metrics)
    alive: list[CheckpointInfo] = []
    for c in all_cps:
        alive.append(c)
        decision = decide_retention(alive, policy, now=c.time, always_keep_latest=False)
        alive = [a for a in alive if a.step in decision.keep]
    return {c.step for c in alive}


class TestOrbaxCompatibleMode:
    """Expectations derived by hand from Orbax's documented CheckpointManager behaviour."""

    def test_max_to_keep_with_keep_period(self) -> None:
        # Newest 2 plus every multiple of 4: 4 and 8 outlive max_to_keep.
        assert orbax_survivors(range(1, 11), max_to_keep=2, keep_period=4) == {4, 8, 9, 10}

    def test_nothing_deleted_without_max_to_keep(self) -> None:
        assert orbax_survivors(range(1, 6), keep_period=2, keep_time_interval=1) == set(range(1, 6))

    def test_best_deletes_the_newest_when_ranked_out(self) -> None:
        # loss:   5  3  4  1  6   -> best two by min loss are steps 4 and 2; 5 is deleted
        metrics = [{"loss": v} for v in (5, 3, 4, 1, 6)]
        kw: dict[str, Any] = {"max_to_keep": 2, "best_metric": "loss", "best_mode": "min"}
        assert orbax_survivors(range(1, 6), metrics=metrics, **kw) == {2, 4}

    def test_keep_time_interval(self) -> None:
        # Saves every 1000 s, one per hour: oldest (t=0) then first at >= 3600 (t=4000),
        # next would need >= 7600; plus the newest one.
        times = [1000.0 * i for i in range(8)]
        result = orbax_survivors(range(1, 9), times=times, max_to_keep=1, keep_time_interval=3600)
        assert result == {1, 5, 8}

    def test_unranked_kept_by_default(self) -> None:
        kw: dict[str, Any] = {"max_to_keep": 1, "best_metric": "acc"}
        result = orbax_survivors(range(1, 5), metrics=acc(None, 0.5, None, 0.7), **kw)
        assert result == {1, 3, 4}

    def test_unranked_fill_free_slots(self) -> None:
        kw: dict[str, Any] = {
            "max_to_keep": 3,
            "best_metric": "acc",
            "keep_checkpoints_without_metrics": False,
        }
        result = orbax_survivors(range(1, 5), metrics=acc(None, 0.5, None, None), **kw)
        assert result == {2, 3, 4}

    def test_unranked_newest_deleted(self) -> None:
        kw: dict[str, Any] = {
            "max_to_keep": 2,
            "best_metric": "acc",
            "keep_checkpoints_without_metrics": False,
        }
        result = orbax_survivors(range(1, 6), metrics=acc(0.9, None, 0.1, 0.5, None), **kw)
        assert result == {1, 4}

    def test_max_to_keep_zero_deletes_even_the_new_one(self) -> None:
        assert orbax_survivors(range(1, 4), max_to_keep=0) == set()
        assert orbax_survivors(range(1, 4), max_to_keep=0, keep_period=2) == {2}

    @pytest.mark.parametrize("mode", ["min", "max"])
    def test_ties_keep_the_newest(self, mode: str) -> None:
        kw: dict[str, Any] = {"max_to_keep": 1, "best_metric": "acc", "best_mode": mode}
        assert orbax_survivors(range(1, 4), metrics=acc(0.5, 0.5, 0.5), **kw) == {3}

    def test_best_with_time_interval(self) -> None:
        metrics = [{"loss": v} for v in (4, 3, 2, 1)]
        kw: dict[str, Any] = {"max_to_keep": 1, "best_metric": "loss", "best_mode": "min"}
        result = orbax_survivors(
            range(1, 5), times=[0, 50, 100, 150], metrics=metrics, keep_time_interval=100, **kw
        )
        assert result == {1, 3, 4}

    def test_deliberate_difference_unranked_on_keep_period(self) -> None:
        # Orbax with max_to_keep=0, a best rule and keep_checkpoints_without_metrics=False
        # deletes unranked checkpoints even on keep_period; here keep_period still keeps them.
        kw: dict[str, Any] = {
            "max_to_keep": 0,
            "best_metric": "acc",
            "keep_checkpoints_without_metrics": False,
        }
        assert orbax_survivors([2, 3], metrics=acc(None, None), keep_period=2, **kw) == {2}

    def test_default_mode_also_keeps_the_newest(self) -> None:
        metrics = [{"loss": v} for v in (5, 3, 4, 1, 6)]
        options = CheckpointManagerOptions(max_to_keep=2, best_metric="loss", best_mode="min")
        decision = decide_retention(
            history(range(1, 6), metrics=metrics),
            retention_policy_from_options(options),
            now=0.0,
            always_keep_latest=options.always_keep_latest,
        )
        assert set(decision.keep) == {2, 4, 5}


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------


def orbax_reference(
    cps: Sequence[CheckpointInfo],
    *,
    n: int | None,
    period: int | None,
    interval: float | None,
    value: Callable[[Metrics], float | None] | None,
    mode: str,
    keep_without: bool,
) -> set[int]:
    """Steps Orbax deletes from ``cps`` (sorted by step), written from its documented
    algorithm: the newest n (or best n) are active, and any other is spared by
    keep_time_interval or keep_period."""
    if n is None or len(cps) <= n:
        return set()
    if value is None:
        unranked: list[CheckpointInfo] = []
        ranked = list(cps)
    else:
        scores = {c.step: value(c.metrics) for c in cps}
        unranked = [c for c in cps if scores[c.step] is None]
        ranked = sorted(
            (c for c in cps if scores[c.step] is not None),
            key=lambda c: scores[c.step] or 0.0,
            reverse=mode == "min",
        )
    if keep_without:
        active = set(unranked) | set(ranked[-n:] if n else [])
        candidates = ranked[:-n] if n else ranked
    else:
        ordered = unranked + ranked
        active = set(ordered[-n:] if n else [])
        candidates = ordered[:-n] if n else ranked
    chain = [cps[0]]
    for c in cps[1:]:
        if interval is not None and c.time >= chain[-1].time + interval:
            chain.append(c)
    spared = {
        c
        for c in candidates
        if (interval is not None and c in chain) or (period is not None and c.step % period == 0)
    }
    return {c.step for c in cps} - {c.step for c in active | spared}


metric_values: st.SearchStrategy[Metrics] = st.one_of(
    st.none(),
    st.just({}),
    st.just({"loss": math.nan}),
    st.integers(0, 6).map(lambda v: {"loss": float(v)}),  # small range: many ties
)


@st.composite
def save_histories(draw: st.DrawFn) -> list[CheckpointInfo]:
    count = draw(st.integers(0, 25))
    step_gaps = draw(st.lists(st.integers(1, 4), min_size=count, max_size=count))
    time_gaps = draw(st.lists(st.integers(1, 3000), min_size=count, max_size=count))
    metrics = draw(st.lists(metric_values, min_size=count, max_size=count))
    steps = [sum(step_gaps[: i + 1]) for i in range(count)]
    times = [float(sum(time_gaps[: i + 1])) for i in range(count)]
    return history(steps, times, metrics)


@st.composite
def retention_options(draw: st.DrawFn) -> CheckpointManagerOptions:
    best = draw(st.booleans())
    return CheckpointManagerOptions(
        max_to_keep=draw(st.none() | st.integers(0, 4)),
        keep_period=draw(st.none() | st.integers(1, 6)),
        keep_time_interval=draw(st.none() | st.integers(500, 5000).map(float)),
        best_metric="loss" if best else None,
        best_mode=draw(st.sampled_from(["min", "max"])),
        keep_checkpoints_without_metrics=draw(st.booleans()),
    )


def loss_of(m: Metrics) -> float | None:
    value = None if m is None else m.get("loss")
    return None if not isinstance(value, float) or math.isnan(value) else value


@settings(max_examples=200, deadline=None)
@given(
    save_histories(),
    retention_options(),
    st.sets(st.integers(1, 60), max_size=3),
    st.sets(st.integers(1, 60), max_size=2),
    st.lists(st.integers(0, 25), max_size=4),
)
def test_incremental_saves_with_restarts(
    cps: list[CheckpointInfo],
    options: CheckpointManagerOptions,
    protected: set[int],
    in_progress: set[int],
    restarts: list[int],
) -> None:
    policy = retention_policy_from_options(options)
    n = options.max_to_keep
    sign = 1.0 if options.best_mode == "max" else -1.0
    interval = options.keep_time_interval
    assert not isinstance(interval, datetime.timedelta)

    def decide(alive: list[CheckpointInfo]) -> RetentionDecision:
        return decide_retention(
            alive, policy, now=alive[-1].time, protected=protected, in_progress=in_progress
        )

    alive: list[CheckpointInfo] = []
    for i, c in enumerate(cps):
        alive.append(c)
        decision = decide(alive)
        keep = set(decision.keep)
        assert keep | set(decision.delete) == {a.step for a in alive}
        assert not keep & set(decision.delete)
        assert list(decision.delete) == sorted(decision.delete)
        assert all(decision.keep.values())

        assert c.step in keep  # the newest survives (default mode)
        assert {a.step for a in alive} & (protected | in_progress) <= keep
        if n is None:
            assert not decision.delete
        else:
            if options.keep_period is not None:
                assert {a.step for a in alive if a.step % options.keep_period == 0} <= keep
            others = {c.step} | protected | in_progress
            if options.keep_period is not None:
                others |= {a.step for a in alive if a.step % options.keep_period == 0}
            if interval is not None:
                others |= set(KeepEveryNSeconds(interval).keep(alive, 0.0))
            if options.best_metric is not None:
                ranked = sorted(
                    (sign * loss, a.step) for a in alive if (loss := loss_of(a.metrics)) is not None
                )
                best = {step for _, step in ranked[-n:]} if n else set()
                assert best <= keep  # the best n survive
                if options.keep_checkpoints_without_metrics:
                    others |= {a.step for a in alive if loss_of(a.metrics) is None}
            assert len(keep - others) <= n  # nothing else beyond max_to_keep

        alive = [a for a in alive if a.step in keep]
        if i in restarts:  # a new process decides from the survivors alone
            again = decide(list(alive))
            assert again.delete == ()
            assert again.keep == decision.keep

    if cps:  # path independent: deciding once over the whole history agrees
        once = decide_retention(
            cps, policy, now=cps[-1].time, protected=protected, in_progress=in_progress
        )
        assert set(once.keep) == {a.step for a in alive}


@settings(max_examples=200, deadline=None)
@given(save_histories(), retention_options())
def test_orbax_mode_matches_reference(
    cps: list[CheckpointInfo], options: CheckpointManagerOptions
) -> None:
    n = options.max_to_keep
    best = options.best_metric is not None
    assume(not (n == 0 and best and not options.keep_checkpoints_without_metrics))
    interval = options.keep_time_interval
    assert not isinstance(interval, datetime.timedelta)
    policy = retention_policy_from_options(options)
    alive: list[CheckpointInfo] = []
    for c in cps:
        alive.append(c)
        expected = orbax_reference(
            alive,
            n=n,
            period=options.keep_period,
            interval=interval,
            value=loss_of if best else None,
            mode=options.best_mode,
            keep_without=options.keep_checkpoints_without_metrics,
        )
        decision = decide_retention(alive, policy, now=c.time, always_keep_latest=False)
        assert set(decision.delete) == expected
        alive = [a for a in alive if a.step in decision.keep]
