"""A tiny robo_orchard_lab ``HookBasedTrainer`` run with ``CheckpointHook`` (one line).

    python robo_train.py OUT [--accum N] [--kill-at-batch K] [--interval S]

Logs the micro-batches it trains on and the final state, like ../accel_train.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tv_shim

tv_shim.install()

import torch  # noqa: E402
from resume_check import EPOCHS, tiny_problem  # noqa: E402
from robo_orchard_core.utils.hook import HookContext  # noqa: E402
from robo_orchard_lab.pipeline.batch_processor.simple import SimpleBatchProcessor  # noqa: E402
from robo_orchard_lab.pipeline.hook_based_trainer import HookBasedTrainer  # noqa: E402
from robo_orchard_lab.pipeline.hooks.mixin import PipelineHooks  # noqa: E402

from checkpointing import CheckpointManager, CheckpointManagerOptions  # noqa: E402
from trainer_adapters.robo_orchard import CheckpointHook  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--kill-at-batch", type=int, default=None)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--max-step", type=int, default=None)
    args = parser.parse_args()

    accelerator, model, optimizer, loader, scheduler = tiny_problem(args.accum)
    seen: list[list[int]] = []

    def forward(model, batch):
        xb, yb, ids = batch
        seen.append(ids.tolist())
        out = model(xb)
        return {"out": out}, torch.nn.functional.mse_loss(out, yb)

    log = open(args.out / "batches_rank0.log", "a")  # noqa: SIM115
    options = CheckpointManagerOptions(save_interval_steps=args.interval, max_to_keep=2)
    manager = CheckpointManager(args.out / "ckpt", options)
    ckpt_hook = CheckpointHook(manager)

    def after_step(hook_args) -> None:
        log.write(f"{ckpt_hook.batches} {seen[-1]}\n")
        log.flush()
        if ckpt_hook.batches == args.kill_at_batch:
            ckpt_hook.ckpt.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    logger = PipelineHooks()
    logger.register_hook("on_step", HookContext.from_callable(after=after_step))
    trainer = HookBasedTrainer(
        accelerator=accelerator,
        model=model,
        dataloader=loader,
        batch_processor=SimpleBatchProcessor.from_callable(forward),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        hooks=[ckpt_hook, logger],  # <- the one line: CheckpointHook(manager)
        max_epoch=None if args.max_step else EPOCHS,
        max_step=args.max_step,
    )
    log.write("resume\n")
    trainer()
    torch.save(
        {
            "model": accelerator.unwrap_model(trainer.model).state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.lr_scheduler.state_dict(),
            "counter": trainer.trainer_progress_state.global_step_id,
            "step": ckpt_hook.ckpt.progress.step,
        },
        args.out / "final_rank0.pt",
    )
    manager.close()


if __name__ == "__main__":
    main()
