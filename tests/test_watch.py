"""Evaluation jobs: the new-checkpoint iterator, reader leases, metrics written back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, checkpoints_iterator, leases
from checkpointing.storage import LocalStorage

STATE = {"x": torch.ones(3)}


def _writer(path: Path, **options: object) -> CheckpointManager:
    opts = CheckpointManagerOptions(enable_async_checkpointing=False, **options)  # type: ignore[arg-type]
    return CheckpointManager(path, opts)


def test_iterator_yields_the_newest_then_waits_and_times_out(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, STATE)
        seen = []
        for step in checkpoints_iterator(str(tmp_path), timeout=0.3, poll_interval_secs=0.05):
            seen.append(step)
            if step == 3:
                mgr.save(4, STATE)
                mgr.save(5, STATE)
    assert seen == [3, 5]


def test_every_step_yields_each_in_order(tmp_path: Path) -> None:
    with _writer(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, STATE)
    it = checkpoints_iterator(str(tmp_path), timeout=0.2, poll_interval_secs=0.05, every_step=True)
    assert list(it) == [1, 2, 3]


def test_timeout_fn_can_keep_waiting(tmp_path: Path) -> None:
    calls = []

    def keep_waiting_once() -> bool:
        calls.append(time.monotonic())
        return len(calls) > 1

    with _writer(tmp_path) as mgr:
        mgr.save(1, STATE)
    it = checkpoints_iterator(
        str(tmp_path), timeout=0.1, timeout_fn=keep_waiting_once, poll_interval_secs=0.02
    )
    assert list(it) == [1] and len(calls) == 2


def test_lease_defers_deletion_until_released(tmp_path: Path) -> None:
    with _writer(tmp_path, max_to_keep=1) as trainer:
        trainer.save(1, STATE)
        reader = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        with reader.reading(1) as present:
            assert present
            trainer.save(2, STATE)
            trainer.save(3, STATE)
            assert trainer.all_steps() == [1, 3], "the leased step survives retention"
            assert reader.restore(step=1) is not None
        trainer.save(4, STATE)
        assert trainer.all_steps() == [4], "retention catches up once the lease ended"
        reader.close()


def test_expired_lease_is_ignored(tmp_path: Path) -> None:
    with _writer(tmp_path, max_to_keep=1) as trainer:
        trainer.save(1, STATE)
        lease = tmp_path / leases.LEASE_DIR / f"1.{'c' * 32}.json"  # a crashed reader's
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(json.dumps({"step": 1, "expires_at": time.time() - 1}))
        trainer.save(2, STATE)
        assert trainer.all_steps() == [2] and not lease.exists()


def test_lease_and_deletion_race_has_one_winner(tmp_path: Path) -> None:
    """A reader leasing a step just after the trainer read the leases: whichever of the
    two looks second sees the other's file."""
    with _writer(tmp_path) as trainer:
        trainer.save(1, STATE)
        storage = LocalStorage(tmp_path, create=False)
        reader = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        with leases.deleting(storage, 1) as free:
            assert free
            with reader.reading(1) as present:
                assert not present, "the reader looked second: it skips the step"
        with reader.reading(1) as present, leases.deleting(storage, 1) as free:
            assert present and not free, "the trainer looked second: it keeps the step"
        assert not list((tmp_path / leases.LEASE_DIR).iterdir()), "marks and leases are gone"
        reader.close()


def test_recorded_metrics_drive_best_n_in_the_writer(tmp_path: Path) -> None:
    with _writer(tmp_path, max_to_keep=1, best_metric="eval/acc") as trainer:
        for step in (1, 2, 3):
            trainer.save(step, STATE)  # no metrics at save time: all kept (unranked)
        evaluator = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        for step, acc in ((1, 0.9), (2, 0.5), (3, 0.7)):
            evaluator.record_metrics(step, {"eval": {"acc": acc}})
        record = json.loads((tmp_path / "step_00000001" / "checkpoint.json").read_text())
        assert record["metrics"] is None, "the commit record is untouched"
        trainer.reload()
        assert trainer.best_step() == 1 and trainer.metrics(1) == {"eval": {"acc": 0.9}}
        trainer.save(4, STATE, metrics={"eval": {"acc": 0.1}})
        assert trainer.all_steps() == [1, 4], "the best by recorded metrics, and the newest"
        evaluator.close()


TRAINER = """
import sys, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
opts = CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True)
with CheckpointManager(sys.argv[1], opts) as mgr:
    for step in range(1, 41):
        mgr.save(step, {"w": torch.full((256, 1024), float(step))})
"""


def test_evaluator_and_trainer_at_once_with_aggressive_retention(tmp_path: Path) -> None:
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINER), str(tmp_path)])
    evaluated = []
    try:
        while not (tmp_path / ".lock").exists():
            time.sleep(0.05)
        for step in checkpoints_iterator(
            str(tmp_path), timeout=5, poll_interval_secs=0.01, every_step=True
        ):
            with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as reader:
                restored = reader.restore(step=step)  # complete and verified, or it raises
            assert restored is not None and torch.equal(
                restored["w"], torch.full((256, 1024), float(step))
            )
            time.sleep(0.05)  # a slow evaluation: the trainer moves on meanwhile
            evaluated.append(step)
    finally:
        assert trainer.wait(timeout=120) == 0
    assert len(evaluated) >= 2 and evaluated == sorted(evaluated) and evaluated[-1] == 40
    with _writer(tmp_path, max_to_keep=1) as mgr:  # retention catches up
        mgr.save(41, STATE)
        assert mgr.all_steps() == [41]
