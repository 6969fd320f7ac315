"""A tiny Accelerate training run using `AccelerateCheckpointer` in a plain loop.

    python accel_train.py OUT [--accum N] [--kill-at-batch K] [--interval S] [--eval]
    accelerate launch --multi_gpu --num_processes 2 accel_train.py  (gloo on CPU) OUT ...

Logs every micro-batch it trains on (``OUT/batches_rank<r>.log``: global micro-batch
number, sample ids) and, at the end, the final parameters and optimizer state
(``OUT/final_rank<r>.pt``). ``--kill-at-batch K`` SIGKILLs this process after the K-th
micro-batch of the run (counted from the start of training, not of this process), once
any save in flight is committed. ``--eval`` iterates an evaluation DataLoader after each
epoch, as Hugging Face's ``examples/by_feature/checkpointing.py`` does: starting its
iterator draws a seed from the global RNG, which the training's dropout then continues.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from resume_check import BATCH, EPOCHS, SAMPLES, tiny_problem

from checkpointing import CheckpointManagerOptions
from trainer_adapters.accelerate import AccelerateCheckpointer


class Counter:
    """A custom object given to register_for_checkpointing."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--kill-at-batch", type=int, default=None)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--eval", action="store_true")
    args = parser.parse_args()

    accelerator, model, optimizer, loader, scheduler = tiny_problem(args.accum)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    evaluation = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 6)))
    counter = Counter()
    accelerator.register_for_checkpointing(counter)

    options = CheckpointManagerOptions(save_interval_steps=args.interval, max_to_keep=2)
    ckpt = AccelerateCheckpointer(
        args.out / "ckpt", accelerator, options=options, total_epochs=EPOCHS
    )
    restored = ckpt.restore()
    rank = accelerator.process_index
    log = open(args.out / f"batches_rank{rank}.log", "a")  # noqa: SIM115
    log.write(f"resume {restored}\n")
    for _epoch in ckpt.epochs():
        for xb, yb, ids in ckpt.batches(loader):
            with accelerator.accumulate(model):
                noise = random.random() * float(np.random.rand()) * 1e-3  # python + numpy RNG
                loss = torch.nn.functional.mse_loss(model(xb) + noise, yb)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            counter.n += 1
            done = ckpt.step()
            p = ckpt.progress
            n = p.epoch * (SAMPLES // BATCH // accelerator.num_processes) + p.batch
            log.write(f"{n} {ids.tolist()}\n")
            log.flush()
            if args.kill_at_batch is not None and n == args.kill_at_batch:
                ckpt.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            if done:
                break
        if args.eval:
            for _batch in evaluation:
                pass
    ckpt.finish()
    unwrapped = accelerator.unwrap_model(model)
    torch.save(
        {
            "model": unwrapped.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "counter": counter.n,
            "step": ckpt.progress.step,
        },
        args.out / f"final_rank{rank}.pt",
    )
    ckpt.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
