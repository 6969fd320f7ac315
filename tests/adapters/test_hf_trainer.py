"""`CheckpointCallback` in a real ``transformers.Trainer``: SIGKILL training processes at
several points, resume, and end bit-for-bit equal to an uninterrupted run (parameters,
optimizer and scheduler states, the batches trained on, the log history); then the
error paths, in this process."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_check import assert_same_run, run

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import CorruptCheckpointError

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "hf_train.py")


def train(out: Path, *args: str) -> None:
    run([SCRIPT, str(out), *args])


def _resumed_from(out: Path) -> list[int]:
    lines = (out / "batches_rank0.log").read_text().splitlines()
    return [int(line.split()[1]) for line in lines if line.startswith("resume")]


# 8 batches per epoch, 3 epochs, an evaluation after each. A run: "K" is killed once
# step K is done and saved (if the interval says so), "K@eval" in the evaluation after
# step K, before that epoch-end step is saved.
@pytest.mark.parametrize(
    ("accum", "interval", "runs", "resumed", "kept"),
    [
        # mid-epoch, exactly at an epoch end, after the last step
        (1, 1, ["13", "16", "24"], [0, 13, 16, 24], [23, 24]),
        # several kills between saves: each run resumes from an older checkpoint
        (1, 3, ["7", "13", "20"], [0, 6, 12, 18], [21, 24]),
        # in the epoch-end evaluation: resumed with one batch of the epoch left
        (1, 1, ["8@eval", "16@eval"], [0, 7, 15], [23, 24]),
        # gradient accumulation (4 optimizer steps an epoch), and torch's RandomSampler,
        # which draws each epoch's shuffle from the global RNG (the epoch-start RNG state
        # is replayed before the resumed epoch's iterator is made)
        (2, 1, ["3", "8@eval", "12"], [0, 3, 7, 12], [11, 12]),
    ],
)
def test_kill_and_resume_is_bit_exact(
    tmp_path: Path,
    reference: Callable[..., Path],
    accum: int,
    interval: int,
    runs: list[str],
    resumed: list[int],
    kept: list[int],
) -> None:
    config = ["--accum", str(accum), *(["--global-shuffle"] if accum > 1 else [])]
    ref = reference(*config)
    train(tmp_path, *config, "--interval", str(interval), "--runs", *runs, "full")
    assert _resumed_from(tmp_path) == resumed
    assert_same_run(ref, tmp_path)
    final = torch.load(tmp_path / "final_rank0.pt", weights_only=False)
    expected = torch.load(ref / "final_rank0.pt", weights_only=False)
    assert final["log_history"] == expected["log_history"]  # the TrainerState came back
    assert [e["step"] for e in final["log_history"] if "eval_loss" in e] == [
        s * 8 // accum for s in (1, 2, 3)
    ]
    options = CheckpointManagerOptions(read_only=True)
    with CheckpointManager(tmp_path / "ckpt", options) as manager:
        assert manager.all_steps() == kept  # max_to_keep=2
        metrics = manager.metrics(kept[-1])
        assert metrics is not None and {"loss", "eval_loss", "learning_rate"} <= metrics.keys()
    # Nothing pickled: tensors in safetensors, the rest in the JSON record.
    step_files = {p.suffix for p in (tmp_path / "ckpt").glob("step_*/*")}
    assert step_files == {".safetensors", ".json"}


# ---------------------------------------------------------------------- error paths


def _trainer(tmp_path: Path, callback: Any, **arguments: Any) -> Any:
    from hf_train import Samples, Tiny
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        **{"save_strategy": "no", "max_steps": 2, **arguments},
    )
    return Trainer(model=Tiny(), args=args, train_dataset=Samples(8, 0), callbacks=[callback])


@pytest.fixture
def callback(tmp_path: Path) -> Any:
    from trainer_adapters.hf_trainer import CheckpointCallback

    ckpt = CheckpointCallback(tmp_path / "ckpt", CheckpointManagerOptions(max_to_keep=1))
    yield ckpt
    ckpt.close()


def test_train_saves_and_resumes_in_process(tmp_path: Path, callback: Any) -> None:
    trainer = _trainer(tmp_path, callback)
    assert callback.train(trainer).global_step == 2
    assert callback.manager.all_steps() == [2]
    again = _trainer(tmp_path, callback)  # resumed after the last step: no more training
    assert callback.train(again).global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(
        trainer.model.parameters(), again.model.parameters(), strict=True))


def test_a_remote_mirror_gets_the_steps(tmp_path: Path) -> None:
    """Manager arguments pass through: a mirror (here a local URL) receives the steps, and
    a fresh machine resumes from it."""
    from trainer_adapters.hf_trainer import CheckpointCallback

    mirror = (tmp_path / "mirror").as_uri()
    options = CheckpointManagerOptions(max_to_keep=1)
    first = CheckpointCallback(tmp_path / "ckpt", options, remote=mirror)
    first.train(_trainer(tmp_path, first))
    first.close()
    with CheckpointManager(tmp_path / "mirror", CheckpointManagerOptions(read_only=True)) as m:
        assert m.all_steps() == [2]
    elsewhere = CheckpointCallback(tmp_path / "fresh-node", options, remote=mirror)
    trainer = _trainer(tmp_path, elsewhere, max_steps=3)
    assert elsewhere.train(trainer).global_step == 3
    assert elsewhere.manager.all_steps() == [3]
    elsewhere.close()


def test_the_trainers_own_checkpoints_are_refused(tmp_path: Path, callback: Any) -> None:
    trainer = _trainer(tmp_path, callback, save_strategy="steps")
    with pytest.raises(ValueError, match="save_strategy='no'"):
        callback.train(trainer)
    assert callback.manager.all_steps() == []


def test_trainer_train_alone_is_refused(tmp_path: Path, callback: Any) -> None:
    trainer = _trainer(tmp_path, callback)
    with pytest.raises(RuntimeError, match=r"CheckpointCallback\.train\(trainer\)"):
        trainer.train()
    with pytest.raises(TypeError, match="resume_from_checkpoint"):
        callback.train(trainer, resume_from_checkpoint=True)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"state": "{not json", "rng": {}}, "not JSON"),
        ({"state": json.dumps({"global_step": 5, "evil": 1}), "rng": {}}, "unknown fields"),
        ({"state": json.dumps({"global_step": 4}), "rng": {}}, "of step 4"),
        ({"state": 7, "rng": {}}, "not a Trainer checkpoint"),
    ],
)
def test_a_crafted_trainer_state_is_refused(
    tmp_path: Path, callback: Any, item: dict[str, Any], message: str
) -> None:
    assert callback.manager.save(5, {"trainer": item}, force=True)
    callback.wait_until_finished()
    trainer = _trainer(tmp_path, callback)
    with pytest.raises(CorruptCheckpointError, match=message):
        callback.train(trainer)


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.delitem(sys.modules, "trainer_adapters.hf_trainer", raising=False)
    with pytest.raises(ImportError, match=r"torch-checkpoint-manager\[hf\]"):
        importlib.import_module("trainer_adapters.hf_trainer")
