"""A tiny ``transformers.Trainer`` run checkpointed by `CheckpointCallback`.

    python hf_train.py OUT [--accum N] [--interval S] [--runs RUN ...]

Each RUN is one training process, in order, on the same ``OUT``: ``full`` trains to the
end; ``K`` SIGKILLs the process once step K is done and its save (if the policy made
one) is committed, at the next step's begin or at train end; ``K@eval`` SIGKILLs it in
the evaluation after step K, before that step's (deferred) save. Importing transformers
takes seconds, so this driver imports it once and forks each run: every run is a fresh
process that builds its own Trainer, and a killed one really dies of SIGKILL, its
saves in flight with it. The driver exits non-zero unless each run ended as asked.

Logs every micro-batch trained on (``OUT/batches_rank0.log``: global micro-batch number,
sample ids, as the model's forward saw them) and, at the end, the final parameters,
optimizer and scheduler states and the log history (``OUT/final_rank0.pt``). The
Trainer shuffles with its default sampler, the model uses dropout and Python's and
NumPy's RNGs, and an evaluation after every epoch moves the global RNG.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from resume_check import BATCH, EPOCHS, SAMPLES
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from checkpointing import CheckpointManagerOptions
from trainer_adapters.hf_trainer import CheckpointCallback


class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i], "ids": torch.tensor(i)}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
        )
        self.seen: list[list[int]] = []  # sample ids of the training batches, in order

    def forward(self, x: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
        out = self.net(x)
        if self.training:
            self.seen.append(ids.tolist())
            out = out + random.random() * float(np.random.rand()) * 1e-3  # python + numpy RNG
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Recorder(TrainerCallback):
    """Logs the batches trained on; SIGKILLs the process at the asked point."""

    def __init__(self, out: Path, model: Tiny, accum: int, ckpt: CheckpointCallback,
                 kill: tuple[int, str] | None) -> None:
        self.log = open(out / "batches_rank0.log", "a")  # noqa: SIM115
        self.model, self.accum, self.ckpt, self.kill = model, accum, ckpt, kill
        self.n = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.n = state.global_step * self.accum
        self.log.write(f"resume {state.global_step}\n")

    def _batch(self) -> None:
        self.n += 1
        self.log.write(f"{self.n} {self.model.seen.pop(0)}\n")
        self.log.flush()

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._batch()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._batch()

    def _maybe_kill(self, state: Any, when: str) -> None:
        if self.kill == (state.global_step, when):
            self.ckpt.wait_until_finished()
            self.log.close()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_kill(state, "step")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_kill(state, "step")

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_kill(state, "eval")


def session(
    out: Path, accum: int, interval: int, kill: tuple[int, str] | None, global_shuffle: bool
) -> None:
    set_seed(0)
    model = Tiny()
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=accum,
        num_train_epochs=EPOCHS,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        # torch's RandomSampler, which draws each epoch's shuffle from the global RNG
        accelerator_config={"use_seedable_sampler": not global_shuffle},
    )
    ckpt = CheckpointCallback(
        out / "ckpt", CheckpointManagerOptions(save_interval_steps=interval, max_to_keep=2)
    )
    recorder = Recorder(out, model, accum, ckpt, kill)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Samples(SAMPLES, 1),
        eval_dataset=Samples(8, 2),
        callbacks=[ckpt, recorder],
    )
    ckpt.train(trainer)
    timeless = [
        {k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))}
        for entry in trainer.state.log_history
        if "train_runtime" not in entry  # the summary of one train() call
    ]
    assert trainer.optimizer is not None and trainer.lr_scheduler is not None
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.lr_scheduler.state_dict(),
            "step": trainer.state.global_step,
            "counter": trainer.state.epoch,
            "log_history": timeless,
        },
        out / "final_rank0.pt",
    )
    recorder.log.close()
    ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=["full"])
    parser.add_argument("--global-shuffle", action="store_true")
    args = parser.parse_args()
    for run in args.runs:
        kill = None
        if run != "full":
            step, _, when = run.partition("@")
            kill = (int(step), when or "step")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                session(args.out, args.accum, args.interval, kill, args.global_shuffle)
                code = 0 if kill is None else 3  # a kill run that was never killed
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        ok = killed if kill is not None else os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if not ok:
            sys.exit(f"run {run!r} ended with wait status {status}")


if __name__ == "__main__":
    main()
