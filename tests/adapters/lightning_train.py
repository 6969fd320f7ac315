"""A tiny Lightning training run with `ManagedCheckpoint`.

    python lightning_train.py OUT [--interval S] [--kill-after K] [--kill-before K]

Logs every batch it trains on (``OUT/batches_rank0.log``: global batch number, sample
ids) and, at the end, the final parameters, optimizer and scheduler state
(``OUT/final_rank0.pt``). ``--kill-after K`` SIGKILLs the process right after the K-th
batch of the run (counted from the start of training), once any save in flight is
committed; ``--kill-before K`` does so just before the batch after it, i.e. after the
epoch end and its save when K ends an epoch (after ``on_train_end`` for the last batch).
The step uses dropout, a shuffled loader and Python's and NumPy's RNGs; a sanity check
and a validation loop at each epoch end draw from the global RNG too (their loaders'
iterators do). `Model` and `Data` serve the in-process tests as well.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import numpy as np
import torch
from resume_check import BATCH, EPOCHS, SAMPLES

from checkpointing import CheckpointManagerOptions
from trainer_adapters.lightning import ManagedCheckpoint

PER_EPOCH = SAMPLES // BATCH


class Model(pl.LightningModule):
    def __init__(
        self,
        lr: float = 1e-2,
        *,
        log: TextIO | None = None,
        kill_after: int | None = None,
        kill_before: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters("lr")
        self.log_file, self.kill_after, self.kill_before = log, kill_after, kill_before
        self.counter = 0
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xb, yb, _ids = batch
        noise = random.random() * float(np.random.rand()) * 1e-3  # python + numpy RNG
        loss = torch.nn.functional.mse_loss(self.net(xb) + noise, yb)
        self.log("loss", loss)
        self.counter += 1  # here: callbacks' on_train_batch_end (the save) run before ours
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.net(batch[0]).square().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        per_step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        per_epoch = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return [optimizer], [{"scheduler": per_step, "interval": "step"}, per_epoch]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["counter"] = self.counter

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.counter = checkpoint["counter"]

    def _batch_number(self, batch_idx: int) -> int:
        return self.trainer.current_epoch * PER_EPOCH + batch_idx + 1

    def _kill(self) -> None:
        self.trainer.checkpoint_callback.wait_until_finished()  # type: ignore[union-attr]
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._batch_number(batch_idx) - 1 == self.kill_before:
            self._kill()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self._batch_number(batch_idx)
        if self.log_file is not None:
            self.log_file.write(f"{n} {batch[2].tolist()}\n")
            self.log_file.flush()
        if n == self.kill_after:
            self._kill()

    def on_train_end(self) -> None:
        if self.kill_before == EPOCHS * PER_EPOCH:
            self._kill()


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 2, generator=g)
        self.data = torch.utils.data.TensorDataset(x, y, torch.arange(SAMPLES))

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.data, batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.data, batch_size=16)


def make_trainer(*callbacks: pl.Callback, max_epochs: int = EPOCHS) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--kill-before", type=int, default=None)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    log = open(args.out / "batches_rank0.log", "a")  # noqa: SIM115
    model = Model(log=log, kill_after=args.kill_after, kill_before=args.kill_before)
    options = CheckpointManagerOptions(save_interval_steps=args.interval, max_to_keep=2)
    ckpt = ManagedCheckpoint(args.out / "ckpt", options)
    trainer = make_trainer(ckpt)
    log.write(f"resume {ckpt.manager.latest_step()}\n")
    trainer.fit(model, Data())
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "counter": model.counter,
            "step": trainer.global_step,
        },
        args.out / "final_rank0.pt",
    )


if __name__ == "__main__":
    main()
