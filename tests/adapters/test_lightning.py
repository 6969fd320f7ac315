"""`ManagedCheckpoint` in a real Lightning ``Trainer``: SIGKILL a training process at
several points, resume with a plain ``trainer.fit``, and end bit-for-bit equal to an
uninterrupted run (parameters, optimizer and both LR schedulers' state, the sequence of
batches trained on); then the error paths and retention, in process."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_train import PER_EPOCH, Data, Model, make_trainer
from resume_check import EPOCHS, assert_same_run, run

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import UnsupportedTypeError
from trainer_adapters.lightning import ManagedCheckpoint

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "lightning_train.py")


def train(out: Path, *args: str, expect_kill: bool = False) -> None:
    run([SCRIPT, str(out), *args], expect_kill=expect_kill)


# 8 batches per epoch, 3 epochs, a validation loop at each epoch end. ("after", K): killed
# right after batch K's step (an epoch's last step is saved at the epoch end, so a kill
# there resumes mid-epoch from the step before); ("before", K): killed before batch K + 1,
# past the epoch end and its save when K ends an epoch, past on_train_end for the last.
@pytest.mark.parametrize(
    ("interval", "kills"),
    [
        (1, [("after", 13)]),  # mid-epoch: rest of the epoch in its own shuffle
        (1, [("before", 8), ("before", 16)]),  # exactly at epoch ends (saved at the end)
        (1, [("before", PER_EPOCH * EPOCHS)]),  # after the last step: nothing left to do
        (3, [("after", 7), ("after", 16), ("after", 20)]),  # resumed from older steps
    ],
)
def test_kill_and_resume_is_bit_exact(
    tmp_path: Path, reference: Any, interval: int, kills: list[tuple[str, int]]
) -> None:
    ref = reference()
    for where, k in kills:
        train(tmp_path, "--interval", str(interval), f"--kill-{where}", str(k), expect_kill=True)
    train(tmp_path, "--interval", str(interval))
    assert_same_run(ref, tmp_path)
    resumed = [line for line in (tmp_path / "batches_rank0.log").read_text().splitlines()
               if line.startswith("resume")]
    assert len(resumed) == len(kills) + 1 and resumed[0] == "resume None"
    assert all(line != "resume None" for line in resumed[1:])  # each run really resumed


def fit(directory: Path, model: Model | None = None, *, max_epochs: int = 1,
        options: CheckpointManagerOptions | None = None) -> ManagedCheckpoint:
    ckpt = ManagedCheckpoint(directory, options or CheckpointManagerOptions(max_to_keep=2))
    make_trainer(ckpt, max_epochs=max_epochs).fit(model or Model(), Data())
    return ckpt


def test_resume_in_process_and_retention(tmp_path: Path) -> None:
    first = fit(tmp_path, max_epochs=1)
    assert first.restored_step is None and first.last_saved == PER_EPOCH
    model = Model()
    second = fit(tmp_path, model, max_epochs=2)  # the same fit call resumes by itself
    assert second.restored_step == PER_EPOCH and second.last_saved == 2 * PER_EPOCH
    assert model.counter == 2 * PER_EPOCH  # the module's on_load_checkpoint got its value
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [2 * PER_EPOCH - 1, 2 * PER_EPOCH]  # max_to_keep=2
        items = manager.item_metadata()
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(
            items
        )
        assert manager.restore(items=["hyper_parameters"]) == {"hyper_parameters": {"lr": 0.01}}
        metrics = manager.metrics(2 * PER_EPOCH)
        assert metrics is not None and metrics["val_loss"] > 0  # scalar metrics ride along
        weights = manager.restore(items=["state_dict"])
    assert weights is not None
    for name, value in model.state_dict().items():
        assert torch.equal(weights["state_dict"][name], value), name


def test_a_remote_mirror_gets_the_steps(tmp_path: Path) -> None:
    """Manager arguments pass through: a mirror (here a local URL) receives each kept
    step, and a fresh machine resumes from it."""
    mirror = (tmp_path / "mirror").as_uri()
    options = CheckpointManagerOptions(max_to_keep=2)
    ckpt = ManagedCheckpoint(tmp_path / "ckpt", options, remote=mirror)
    make_trainer(ckpt, max_epochs=1).fit(Model(), Data())
    with CheckpointManager(tmp_path / "mirror", CheckpointManagerOptions(read_only=True)) as m:
        assert m.all_steps() == [PER_EPOCH - 1, PER_EPOCH]
    elsewhere = ManagedCheckpoint(tmp_path / "fresh-node", options, remote=mirror)
    make_trainer(elsewhere, max_epochs=2).fit(Model(), Data())
    assert elsewhere.restored_step == PER_EPOCH and elsewhere.last_saved == 2 * PER_EPOCH


def test_replaces_model_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ManagedCheckpoint(tmp_path / "ckpt")
    assert make_trainer(ckpt).checkpoint_callbacks == [ckpt]  # Lightning adds none
    trainer = make_trainer(ckpt, ModelCheckpoint(dirpath=tmp_path / "lightning"))
    with pytest.raises(ValueError, match="also has ModelCheckpoint: remove it"):
        trainer.fit(Model(), Data())
    assert not (tmp_path / "ckpt").exists()  # refused before the manager opened


class _OddState(Model):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["odd"] = {"thing": object()}


def test_state_the_format_cannot_hold_fails_the_save(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTypeError, match="object at odd/thing"):
        fit(tmp_path, _OddState())
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == []


class _OddHparams(Model):
    def __init__(self, activation: Any = torch.relu) -> None:
        super().__init__()
        self.save_hyperparameters()  # a function: not storable without pickle


def test_odd_hyperparameters_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer_adapters"):
        fit(tmp_path, _OddHparams())
    assert "not saving hyper_parameters" in caplog.text
    with CheckpointManager(tmp_path) as manager:
        assert "hyper_parameters" not in manager.item_metadata()
        assert manager.latest_step() == PER_EPOCH
    model = _OddHparams()
    assert fit(tmp_path, model, max_epochs=2).restored_step == PER_EPOCH  # resumable still
    assert model.counter == 2 * PER_EPOCH


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "trainer_adapters.lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'torch-checkpoint-manager\[lightning\]'"):
        importlib.import_module("trainer_adapters.lightning")
