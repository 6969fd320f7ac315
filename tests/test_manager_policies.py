"""Save and retention policies as the manager applies them to real directories."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from clock import FakeClock

from checkpointing import CheckpointManager, CheckpointManagerOptions, UnsupportedTypeError, saving


def _mgr(path: Path, clock: FakeClock | None = None, **options: object) -> CheckpointManager:
    opts = CheckpointManagerOptions(enable_async_checkpointing=False, **options)  # type: ignore[arg-type]
    return CheckpointManager(path, opts, clock=clock or FakeClock())


STATE = {"x": torch.arange(4)}


def test_retention_covers_steps_of_earlier_runs(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr:  # an earlier run without retention
        for step in range(5):
            mgr.save(step, STATE)
    with _mgr(tmp_path, max_to_keep=2) as mgr:
        mgr.save(5, STATE)
        assert mgr.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "step_00000004",
        "step_00000005",
    ]


def test_newest_survives_best_n_and_orbax_mode_deletes_it(tmp_path: Path) -> None:
    losses = {1: 0.1, 2: 0.2, 3: 0.9}
    for keep_latest, expected in ((True, [1, 2, 3]), (False, [1, 2])):
        directory = tmp_path / str(keep_latest)
        with _mgr(
            directory,
            max_to_keep=2,
            best_metric="loss",
            best_mode="min",
            always_keep_latest=keep_latest,
        ) as mgr:
            for step, loss in losses.items():
                mgr.save(step, STATE, metrics={"loss": loss})
            assert mgr.all_steps() == expected
            assert mgr.best_step() == 1
            report = {r.step: r.reasons for r in mgr.retention_report()}
            assert report[1] == ("best 2 by loss (min)",)


def test_metrics_persist_and_a_later_best_rule_uses_them(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr:
        for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)):
            mgr.save(step, STATE, metrics={"eval": {"acc": acc}})
    with _mgr(tmp_path, max_to_keep=1, best_metric="eval/acc") as mgr:
        assert mgr.metrics(2) == {"eval": {"acc": 0.9}}
        assert mgr.best_step() == 2
        mgr.save(5, STATE, metrics={"eval": {"acc": 0.1}})
        assert mgr.all_steps() == [2, 5], "the best one and the newest"


def test_protect_is_persisted_and_never_deleted(tmp_path: Path) -> None:
    with _mgr(tmp_path, max_to_keep=1) as mgr:
        mgr.save(1, STATE)
        mgr.protect(1)
        mgr.save(2, STATE)
        assert mgr.all_steps() == [1, 2]
    with _mgr(tmp_path, max_to_keep=1) as mgr:
        mgr.save(3, STATE)
        assert mgr.all_steps() == [1, 3]
        assert dict((r.step, r.reasons) for r in mgr.retention_report())[1] == ("protected",)
        mgr.unprotect(1)
        mgr.save(4, STATE)
        assert mgr.all_steps() == [4]


def test_a_failed_save_deletes_nothing(tmp_path: Path) -> None:
    with _mgr(tmp_path, max_to_keep=1) as mgr:
        mgr.save(1, STATE)
        with pytest.raises(UnsupportedTypeError):
            mgr.save(2, {"bad": object()})
        assert mgr.all_steps() == [1]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_time_based_saves_use_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    with _mgr(tmp_path, clock, save_interval_secs=60) as mgr:
        assert mgr.save(1, STATE), "nothing saved yet: due"
        clock.now += 30
        assert not mgr.save(2, STATE)
        clock.now += 31
        assert mgr.save(3, STATE)
    with _mgr(tmp_path, clock, save_interval_secs=60) as mgr:  # the last save time survives
        clock.now += 10
        assert not mgr.should_save(4)


def test_a_save_in_flight_counts_for_the_time_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async save still being written is the newest save, from when it began: the
    time rule must not make the next steps due while it is written, nor later count
    from its commit."""
    clock = FakeClock()
    opts = CheckpointManagerOptions(save_interval_secs=60, save_on_initial=True)
    with CheckpointManager(tmp_path, opts, clock=clock) as mgr:
        gate = threading.Event()
        write_step = saving.write_step
        monkeypatch.setattr(saving, "write_step", lambda *a: (gate.wait(10), write_step(*a))[1])
        assert mgr.save(1, STATE), "nothing saved yet: due"
        clock.now += 30  # the save of step 1 commits at 1030, 30 s after it began
        assert not mgr.should_save(2), "step 1 is being saved: neither initial nor due"
        gate.set()
        mgr.wait_until_finished()
        assert not mgr.should_save(2)
        clock.now += 31
        assert mgr.should_save(3), "61 s since the save of step 1 began"


def test_keep_time_interval_uses_commit_times(tmp_path: Path) -> None:
    clock = FakeClock()
    with _mgr(tmp_path, clock, max_to_keep=1, keep_time_interval=100) as mgr:
        for step in range(6):
            mgr.save(step, STATE)
            clock.now += 40  # commits at 1000, 1040, ..., 1200
        assert mgr.all_steps() == [0, 3, 5]


def test_initial_save_only_into_an_empty_directory(tmp_path: Path) -> None:
    with _mgr(tmp_path, save_interval_steps=100, save_on_initial=True) as mgr:
        assert mgr.should_save(7)
        mgr.save(7, STATE)
        assert not mgr.should_save(8)


def test_preemption_signal_makes_the_next_step_save(tmp_path: Path) -> None:
    with _mgr(tmp_path, save_interval_steps=1000, save_on_preemption=True) as mgr:
        assert not mgr.should_save(5) and not mgr.reached_preemption(5)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.should_save(5) and mgr.reached_preemption(5)
        assert mgr.save(5, STATE)
        assert mgr.reached_preemption(5), "the loop still learns it should exit"
        assert not mgr.should_save(6), "one save answers one signal"
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler, None)


def test_user_policy_objects_replace_the_fields(tmp_path: Path) -> None:
    from checkpointing import AnyOf, AtSteps, KeepAnyOf, KeepLatest, KeepSteps, SaveContext

    class EveryPrime:
        def should_save(self, ctx: SaveContext) -> bool:
            return ctx.step > 1 and all(ctx.step % d for d in range(2, ctx.step))

    opts = {
        "save_policy": AnyOf(EveryPrime(), AtSteps([10])),
        "retention_policy": KeepAnyOf(KeepLatest(1), KeepSteps([3])),
    }
    with _mgr(tmp_path, **opts) as mgr:
        saved = [s for s in range(12) if mgr.save(s, STATE)]
        assert saved == [2, 3, 5, 7, 10, 11]
        assert mgr.all_steps() == [3, 11]
