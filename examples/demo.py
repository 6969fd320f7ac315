"""Train, get killed, resume, and prove the result is bit-for-bit the uninterrupted run.

    python3 dev.py demo            # or: .venv/bin/python examples/demo.py

The training loop (`train`) is the reference example of using a CheckpointManager:
restore in place if a checkpoint exists, then save on the manager's policy. Everything a
bit-exact resume needs is in the state: model, optimizer, LR scheduler, the RNG (dropout)
and the position in the shuffled data.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions

STEPS = 300
BATCH = 32
DATA = 2048  # samples; an epoch is DATA // BATCH steps


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(DATA, 64, generator=g)
    y = torch.sin(x @ torch.randn(64, 8, generator=g))
    return x, y


def batch_indices(step: int) -> torch.Tensor:
    """The samples of ``step``: each epoch is a fresh, seeded shuffle."""
    per_epoch = DATA // BATCH
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(DATA, generator=torch.Generator().manual_seed(1000 + epoch))
    return order[position * BATCH : (position + 1) * BATCH]


OPTIONS = CheckpointManagerOptions(
    save_interval_steps=25,  # when to save
    max_to_keep=2,  # keep the newest two ...
    keep_period=100,  # ... plus every 100th step forever
    enable_async_checkpointing=True,  # save() returns after a snapshot
)


def train(directory: Path) -> None:
    """The training job. Safe to kill at any moment and run again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(256, 8)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    x, y = make_data()

    with CheckpointManager(directory, OPTIONS) as mgr:
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": {}}
        restored = mgr.restore(state, missing_ok=True)  # in place; None on a fresh start
        start = 0
        if restored is not None:
            torch.set_rng_state(restored["rng"]["torch"])
            start = restored["rng"]["next_step"]
            print(f"resumed at step {start}", flush=True)

        for step in range(start, STEPS):
            idx = batch_indices(step)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            print(f"step {step} loss {loss.item():.5f}", flush=True)
            # Saved after the update: everything needed to run step + 1 next.
            state["rng"] = {"torch": torch.get_rng_state(), "next_step": step + 1}
            mgr.save(step + 1, state, metrics={"loss": loss.item()})


def run_job(directory: Path, kill_at: int | None = None) -> None:
    """Run `train` in a child process; SIGKILL it once it printed step ``kill_at``."""
    cmd = [sys.executable, __file__, "--train", str(directory)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("resumed"):
            print(f"  {line.strip()}")
        if kill_at is not None and line.startswith(f"step {kill_at} "):
            child.send_signal(signal.SIGKILL)
            child.wait()
            print(f"  killed with SIGKILL after step {kill_at}")
            return
    if child.wait() != 0:
        raise SystemExit(f"training job failed with exit code {child.returncode}")


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as mgr:
        restored = mgr.restore(items=["model", "optimizer"])  # no target: plain tensors
    assert restored is not None
    flat = {f"model/{k}": v for k, v in restored["model"].items()}
    for param, slots in restored["optimizer"]["state"].items():
        flat.update({f"optimizer/{param}/{k}": v for k, v in slots.items()})
    return flat


def print_listing(directory: Path) -> None:
    """Each step with the retention rules (of OPTIONS) that keep it."""
    with CheckpointManager(directory, dataclasses.replace(OPTIONS, read_only=True)) as mgr:
        print(f"\nCheckpoints in {directory}:")
        print(f"  {'step':>5}  {'size':>9}  {'loss':>8}  kept by")
        for row in mgr.retention_report():
            loss = (row.metrics or {}).get("loss", float("nan"))
            print(
                f"  {row.step:>5}  {row.nbytes / 1024:>7.1f}KB  {loss:>8.5f}  "
                f"{', '.join(row.reasons) or '-'}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=Path("runs/demo"), help="work directory")
    parser.add_argument("--kill-at", type=int, default=137, help="step after which to SIGKILL")
    args = parser.parse_args()
    if args.train:
        train(args.train)
        return 0

    shutil.rmtree(args.dir, ignore_errors=True)
    t0 = time.perf_counter()
    print("1. uninterrupted run")
    run_job(args.dir / "uninterrupted")
    print(f"2. run killed after step {args.kill_at}, then resumed")
    run_job(args.dir / "resumed", kill_at=args.kill_at)
    run_job(args.dir / "resumed")

    reference, resumed = (
        final_weights(args.dir / "uninterrupted"),
        final_weights(args.dir / "resumed"),
    )
    same = reference.keys() == resumed.keys() and all(
        torch.equal(
            reference[k].reshape(-1).view(torch.uint8), resumed[k].reshape(-1).view(torch.uint8)
        )
        for k in reference
    )
    print_listing(args.dir / "resumed")
    print(
        f"\n3. final model and optimizer state ({len(reference)} tensors) "
        f"{'are bit-for-bit identical' if same else 'DIFFER'} to the uninterrupted run "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
