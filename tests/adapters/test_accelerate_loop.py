"""`AccelerateCheckpointer` in a plain Accelerate loop: SIGKILL a real training process at
several points, resume, and end bit-for-bit equal to an uninterrupted run (parameters,
optimizer state, and the sequence of batches trained on)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from resume_check import assert_same_run, run

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "accel_train.py")


def train(out: Path, *args: str, procs: int = 1, expect_kill: bool = False) -> None:
    cmd = [SCRIPT, str(out), *args]
    if procs > 1:  # torchrun under the hood; the script asks Accelerate for the CPU (gloo)
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            *cmd,
        ]
    run(cmd, expect_kill=expect_kill, launched=procs > 1)


# Micro-batches per epoch: 8. Kill points: mid-epoch, exactly at an epoch end, after the
# last step; several kills in one run; a kill between saves (resume from an older one).
@pytest.mark.parametrize(
    ("accum", "interval", "kills", "evaluate"),
    [
        (1, 1, [13], False),  # mid-epoch (of the second epoch: its own shuffle)
        (1, 1, [16], False),  # exactly at an epoch end
        (1, 1, [24], False),  # after the last step
        (1, 3, [7, 13, 20], False),  # several kills, each resumed from an older checkpoint
        (2, 1, [6, 16, 23], False),  # gradient accumulation: a kill between micro-steps too
        (1, 1, [16, 17], True),  # an evaluation loop after each epoch (the HF example)
    ],
)
def test_kill_and_resume_is_bit_exact(
    tmp_path: Path, reference, accum: int, interval: int, kills: list[int], evaluate: bool
) -> None:
    extra = ["--eval"] if evaluate else []
    ref = reference("--accum", str(accum), *extra)
    for k in kills:
        train(
            tmp_path,
            "--accum",
            str(accum),
            "--interval",
            str(interval),
            "--kill-at-batch",
            str(k),
            *extra,
            expect_kill=True,
        )
    train(tmp_path, "--accum", str(accum), "--interval", str(interval), *extra)
    assert_same_run(ref, tmp_path)


@pytest.mark.timeout(600)
def test_two_processes_kill_and_resume(tmp_path: Path, reference) -> None:
    """``accelerate launch`` with 2 CPU processes (gloo): 4 micro-batches per epoch each."""
    ref = reference(procs=2)
    train(tmp_path, "--kill-at-batch", "6", procs=2, expect_kill=True)  # mid-epoch
    train(tmp_path, "--kill-at-batch", "8", procs=2, expect_kill=True)  # at an epoch end
    train(tmp_path, procs=2)
    assert_same_run(ref, tmp_path, ranks=2)
    # one copy of the replicated state; each process's RNG and data position apart
    latest = sorted((tmp_path / "ckpt").glob("step_*"))[-1]
    names = {p.name for p in latest.iterdir()}
    assert {"model.safetensors", "rank.rank0.safetensors", "rank.rank1.safetensors"} <= names


def test_helpers(tmp_path: Path) -> None:
    from checkpointing import CheckpointManager, CheckpointManagerOptions, checkpoint_n_naming
    from trainer_adapters.accelerate import get_accelerate_project_last_checkpoint_id

    assert get_accelerate_project_last_checkpoint_id(tmp_path) == -1
    opts = CheckpointManagerOptions(step_naming=checkpoint_n_naming())
    with CheckpointManager(tmp_path / "checkpoints", opts) as mgr:
        for step in (1, 2, 10):
            mgr.save(step, {"x": torch.zeros(1)})
    (tmp_path / "checkpoints" / "checkpoint_99").mkdir()  # no commit record: not a step
    assert get_accelerate_project_last_checkpoint_id(tmp_path) == 10
    shutil.rmtree(tmp_path / "checkpoints")
