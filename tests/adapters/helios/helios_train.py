"""A tiny Helios run with ``CheckpointedTrainer`` (the one line), or ``helios.Trainer``.

    python helios_train.py OUT --unit iteration|epoch [--freq F] [--accum N]
        [--save-steps S] [--own-manager] [--workers W] [--kill-at-batch K]
        [--preempt-at P] [--native] [--then-test]

Logs the micro-batches it trains on and the final state, like ../robo_orchard/robo_train.py.
With ``--kill-at-batch K`` it SIGKILLs itself once K micro-batches are done (at the next
batch's start, or at the end of training), after any save of that step has committed.
`main` is also run in forked children by the tests (see test_helios_trainer.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tv_shim

tv_shim.install()

import helios  # noqa: E402
import torch  # noqa: E402
from helios import data as hld, model as hlm  # noqa: E402
from helios.core import rng  # noqa: E402
from resume_check import BATCH, EPOCHS, SAMPLES  # noqa: E402

from checkpointing import CheckpointManager, CheckpointManagerOptions  # noqa: E402
from trainer_adapters.helios import CheckpointedTrainer  # noqa: E402

HUNG = 3  # exit code: the run kept starting empty epochs (native Helios after an epoch end)


class NoisyData(torch.utils.data.TensorDataset):
    """Adds noise drawn from Helios's NumPy generator: in a worker process it is seeded
    from the loader's base seed, so only a replayed base seed gives the same samples."""

    def __getitem__(self, index: int) -> Any:
        x, y, i = super().__getitem__(index)
        noise = torch.from_numpy(rng.get_default_numpy_rng().normal(size=6)).float()
        return x + 0.1 * noise, y, i


class Data(hld.DataModule):
    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = workers

    def setup(self) -> None:
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 2, generator=g)
        kind = NoisyData if self.workers else torch.utils.data.TensorDataset
        self._add_train_phase(
            kind(x, y, torch.arange(SAMPLES)),
            hld.DataLoaderParams(batch_size=BATCH, shuffle=True, num_workers=self.workers),
        )


class Tiny(hlm.Model):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__("tiny")
        self.args = args
        self.log = open(args.out / "batches_rank0.log", "a")  # noqa: SIM115
        self.done = 0  # micro-batches done in this process (the last one seen)
        self.state: Any = None
        self.empty_epochs = 0

    def setup(self, for_inference: bool = False) -> None:
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(16, 2),
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.7)

    def train(self) -> None:
        self.net.train()

    def user_state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_user_state_dict(self, state: dict[str, Any], for_inference: bool) -> None:
        self.net.load_state_dict(state["net"])
        if not for_inference:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def on_training_epoch_start(self, current_epoch: int) -> None:
        self.empty_epochs += 1  # epochs started since the last batch
        if self.empty_epochs > 20:  # a resumed native run stuck in empty epochs
            self.log.write("hung\n")
            self.log.flush()
            os._exit(HUNG)

    def on_training_batch_start(self, state: Any) -> None:
        if state.global_iteration - 1 == self.args.kill_at_batch:
            self.kill()

    def train_step(self, batch: Any, state: Any) -> None:
        x, y, ids = batch
        self.state, self.done, self.empty_epochs = state, state.global_iteration, 0
        self.log.write(f"{state.global_iteration} {ids.tolist()}\n")
        self.log.flush()
        scale = 1.0 + 1e-3 * float(rng.get_default_numpy_rng().normal())  # Helios's RNG too
        loss = torch.nn.functional.mse_loss(self.net(x), y) * scale / self.args.accum
        loss.backward()
        if state.global_iteration % self.args.accum == 0:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()

    def on_training_batch_end(self, state: Any, should_log: bool = False) -> None:
        if state.global_iteration == self.args.preempt_at:  # the scheduler's notice
            os.kill(os.getpid(), signal.SIGTERM)

    def on_training_end(self) -> None:
        if self.done == self.args.kill_at_batch:  # killed after the last step
            self.kill()

    def kill(self) -> None:
        manager = getattr(self.trainer, "manager", None)
        if manager is not None:
            manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--unit", choices=["iteration", "epoch"], required=True)
    parser.add_argument("--freq", type=int, default=None)  # Helios's chkpt_frequency
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=None)  # a manager rule of its own
    parser.add_argument("--own-manager", action="store_true")  # pass a CheckpointManager
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--kill-at-batch", type=int, default=None)
    parser.add_argument("--preempt-at", type=int, default=None)  # SIGTERM after batch N
    parser.add_argument("--native", action="store_true")  # plain helios.Trainer
    parser.add_argument("--then-test", action="store_true")  # Trainer.test() afterwards
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    batches_per_epoch = SAMPLES // BATCH
    total = EPOCHS if args.unit == "epoch" else EPOCHS * batches_per_epoch // args.accum
    helios_args = dict(
        train_unit=args.unit,
        total_steps=total,
        chkpt_frequency=args.freq,
        accumulation_steps=args.accum,
        use_cpu=True,
        random_seed=0,
        chkpt_root=args.out / "chkpt",
        print_banner=False,
        enable_file_logging=True,
        log_root=args.out / "logs",
    )
    manager = None
    if args.native:
        trainer = helios.Trainer(**helios_args)
    else:
        options = CheckpointManagerOptions(
            max_to_keep=2,
            save_interval_steps=args.save_steps,
            save_on_steps=[11] if args.own_manager else None,
            save_on_preemption=args.preempt_at is not None,
        )
        if args.own_manager:
            manager = CheckpointManager(args.out / "own", options)
        trainer = CheckpointedTrainer(  # <- the one line: was helios.Trainer(...)
            **helios_args, manager=manager, options=None if manager else options
        )
    model = Tiny(args)
    model.log.write("resume\n")
    trainer.fit(model, Data(args.workers))
    state = getattr(trainer, "training_state", None) or model.state
    final = {
        "model": model.net.state_dict(),
        "optimizer": model.optimizer.state_dict(),
        "scheduler": model.scheduler.state_dict(),
        "counter": state.global_iteration,
        "step": state.current_iteration,
    }
    torch.save(final, args.out / "final_rank0.pt")
    if args.then_test:  # a fresh model gets the newest checkpoint's networks
        fresh = Tiny(args)
        CheckpointedTrainer(**helios_args, manager=manager).test(fresh, Data(args.workers))
        torch.save(fresh.net.state_dict(), args.out / "tested_rank0.pt")
    if manager is not None:
        manager.close()


if __name__ == "__main__":
    main()
