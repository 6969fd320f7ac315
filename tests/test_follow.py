"""Following a directory: the new-checkpoint iterator, beside a live trainer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, checkpoints_iterator

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


def test_an_evaluator_restores_each_step_the_iterator_yields(tmp_path: Path) -> None:
    """An evaluation job opened one read-only manager, then restored each step the
    iterator handed it: every one after the first raised CheckpointNotFoundError (call
    reload()), as the manager's listing was older than the step (a new user's trial)."""
    with _writer(tmp_path) as mgr:
        mgr.save(1, {"x": torch.full((3,), 1.0)})
        evaluator = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        seen = []
        for step in checkpoints_iterator(str(tmp_path), timeout=0.3, poll_interval_secs=0.05):
            restored = evaluator.restore(step=step)
            assert restored is not None
            seen.append((step, float(restored["x"][0])))
            if step < 3:
                mgr.save(step + 1, {"x": torch.full((3,), step + 1.0)})
        assert evaluator.latest_step() == 3
        evaluator.close()
    assert seen == [(1, 1.0), (2, 2.0), (3, 3.0)]


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
