"""`CheckpointedTrainer` with the real helios-ml ``Trainer``: SIGKILL a training process at
several points, resume, end bit-for-bit equal to an uninterrupted run; and the native
trainer's resume defects it fixes, shown on the same run.

Runs in the ``.venv-helios`` environment (helios-ml needs numpy>=2.1); ``python3 dev.py
test`` builds it and runs this directory there.

Each run is a real process killed by a real SIGKILL. Most are forked from this process,
which imports torch and helios once (3 s per fresh interpreter otherwise) and only
compares the files the children write; the native comparison runs the script in a fresh
interpreter. Children use one torch thread, so no OpenMP pool crosses a fork.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import helios_train  # imports torch and helios once, before the children are forked
import pytest
import torch
from resume_check import assert_same_run, effective_batches, run

SCRIPT = str(Path(__file__).resolve().parent / "helios_train.py")


def train(out: Path, *args: str, expect: int | None = 0) -> None:
    """Run ``helios_train.main`` in a forked child; ``expect``: its exit code, or None
    for death by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's exit code
        code = 1
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
        signal.alarm(120)  # a hung child dies instead of outliving the test
        try:
            helios_train.main([str(out), *args])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if expect is None:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == expect, status


ITERATION, EPOCH = ("--unit", "iteration", "--freq", "1"), ("--unit", "epoch", "--freq", "1")


# 8 micro-batches per epoch, 3 epochs.
@pytest.mark.parametrize(
    ("args", "kills"),
    [
        # mid-epoch (second epoch), exactly at an epoch end, after the last step
        (ITERATION, [13, 16, 24]),
        (EPOCH, [13, 16, 24]),
        # gradient accumulation over 3 batches, windows across epoch ends; saves every
        # 2 steps (6 batches): kills between saves resume from older ones
        (("--unit", "iteration", "--freq", "2", "--accum", "3"), [7, 16, 23]),
        # epoch unit, no chkpt_frequency: the manager's own rule saves mid-epoch
        (("--unit", "epoch", "--save-steps", "3"), [7, 14]),
        # a manager of the user's (saves step 11) with chkpt_frequency=5 OR'ed in
        (("--unit", "iteration", "--freq", "5", "--own-manager"), [13, 22]),
        # a worker process whose samples draw from its seed: the base seed is replayed
        (("--unit", "iteration", "--freq", "1", "--workers", "1"), [13, 16]),
    ],
    ids=["iteration", "epoch", "accumulation", "epoch-manager-rule", "own-manager", "worker"],
)
def test_kill_and_resume_is_bit_exact(tmp_path: Path, reference, args, kills) -> None:
    ref = reference(*args)
    for k in kills:
        train(tmp_path, *args, "--kill-at-batch", str(k), expect=None)
    train(tmp_path, *args)
    assert_same_run(ref, tmp_path)
    assert len(os.listdir(tmp_path / "logs")) == 1  # resumed runs went on with its log file


def test_preemption_saves_and_stops_then_resumes_exactly(tmp_path: Path, reference) -> None:
    """With ``save_on_preemption``, SIGTERM after batch 13 saves step 13 at once (not a
    multiple of chkpt_frequency) and ends ``fit`` normally; the next run goes on exactly."""
    args = ("--unit", "iteration", "--freq", "5")
    train(tmp_path, *args, "--preempt-at", "13")
    assert "epoch_2_iter_13" in os.listdir(tmp_path / "chkpt" / "tiny")
    assert len(effective_batches(tmp_path / "batches_rank0.log")) == 13
    train(tmp_path, *args)
    assert_same_run(reference(*args), tmp_path)


@pytest.mark.parametrize("args", [ITERATION, EPOCH], ids=["iteration", "epoch"])
def test_same_run_as_native_helios_and_helios_names(tmp_path: Path, reference, args) -> None:
    """Uninterrupted, the adapter trains exactly like ``helios.Trainer`` (this one in a
    fresh interpreter); its step directories are named like Helios's files, retention
    (max_to_keep=2) applies, and ``Trainer.test`` loads the newest networks."""
    ref = reference(*args)
    run([SCRIPT, str(tmp_path), *args, "--native"])
    assert_same_run(ref, tmp_path)
    names = sorted(p for p in os.listdir(ref / "chkpt" / "tiny") if not p.startswith("."))
    native = sorted(
        p.removeprefix("tiny_").removesuffix(".pth")
        for p in os.listdir(tmp_path / "chkpt" / "tiny")
    )
    assert names == native[-2:]  # epoch_3_iter_23/24 or epoch_2_iter_16, epoch_3_iter_24

    tested = tmp_path / "tested"
    tested.mkdir()
    train(tested, *args, "--then-test")
    final = torch.load(tested / "final_rank0.pt")["model"]
    loaded = torch.load(tested / "tested_rank0.pt")
    assert all(torch.equal(final[k], loaded[k]) for k in final)


def test_native_helios_mid_epoch_resume_uses_the_wrong_batches(tmp_path: Path, reference) -> None:
    """The defect fixed: killed mid-epoch (batch 13 = 5 of epoch 2), helios.Trainer
    resumes 5 batches into the *next* epoch's shuffle."""
    ref = reference(*ITERATION)
    train(tmp_path, *ITERATION, "--native", "--kill-at-batch", "13", expect=None)
    train(tmp_path, *ITERATION, "--native")
    seen, wanted = (
        effective_batches(tmp_path / "batches_rank0.log"),
        effective_batches(ref / "batches_rank0.log"),
    )
    assert seen[:13] == wanted[:13]
    assert [ids for _, ids in seen[13:16]] == [ids for _, ids in wanted[21:24]]


def test_native_helios_hangs_after_an_epoch_end_checkpoint(tmp_path: Path) -> None:
    """The defect fixed: resumed from a checkpoint taken at an epoch end, helios.Trainer
    starts empty epochs forever (the script exits with HUNG after 20 of them)."""
    train(tmp_path, *ITERATION, "--native", "--kill-at-batch", "16", expect=None)
    train(tmp_path, *ITERATION, "--native", expect=helios_train.HUNG)
