"""`CheckpointHook` in robo_orchard_lab's real ``HookBasedTrainer``: SIGKILL a training
process at several points, resume, end bit-for-bit equal to an uninterrupted run.

Runs in the ``.venv-robo`` environment (robo-orchard-lab pins numpy<2 and an old
pydantic); ``python3 dev.py test`` builds it and runs this directory there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from resume_check import assert_same_run, run

SCRIPT = str(Path(__file__).resolve().parent / "robo_train.py")


def train(out: Path, *args: str, expect_kill: bool = False) -> None:
    run([SCRIPT, str(out), *args], expect_kill=expect_kill)


# 8 micro-batches per epoch, 3 epochs.
@pytest.mark.parametrize(
    ("args", "kills"),
    [
        (("--interval", "1"), [13]),  # mid-epoch (second epoch)
        (("--interval", "1"), [16]),  # exactly at an epoch end
        (("--interval", "1"), [24]),  # after the last step
        (("--interval", "3"), [7, 14, 22]),  # kills between saves: resume from older ones
        (("--accum", "2", "--interval", "1"), [6, 16, 23]),  # gradient accumulation
        (("--max-step", "20", "--interval", "4"), [20]),  # max_step: ends mid-epoch
    ],
)
def test_kill_and_resume_is_bit_exact(tmp_path: Path, reference, args, kills) -> None:
    ref = reference(*args)
    for k in kills:
        train(tmp_path, *args, "--kill-at-batch", str(k), expect_kill=True)
    train(tmp_path, *args)
    assert_same_run(ref, tmp_path)
