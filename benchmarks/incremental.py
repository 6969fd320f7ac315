"""Incremental saves of a LoRA fine-tune: bytes written and durable save time per
checkpoint, against a full save of the same state, the disk, and torch.save.

    .venv/bin/python benchmarks/incremental.py [--base-gb 1] [--rank 8] [--rounds 5] [--dir DIR]
                                               [--all-change]

The state: a frozen GPT-shaped float32 base model of ``--base-gb``, rank-``--rank``
LoRA adapters on every linear layer of its blocks, and AdamW over the adapters. Before
every save a training step changes the adapters and the optimizer state (random
gradients); the base never changes. Every round runs each method once, starting one
further along each round, after ``--settle`` idle seconds:

  ours full         a manager with incremental=False: every save writes everything.
  ours incremental  a manager with incremental=True, open across rounds; its first save
                    (complete, like a restarted run's) is made before the rounds.
  disk              the full state's bytes written with O_DIRECT, then fsync: the limit
                    of any save that writes them all.
  torch.save        the full state's state_dicts, then fsync.
  ... async         the two managers with async saves: the time the training thread
                    waits (the snapshot), each save then finished before the next method.

The other saves are synchronous and durable (data and directories fsync'd when they
return).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpointing import CheckpointManager, CheckpointManagerOptions

sys.path.insert(0, str(Path(__file__).parent))
from _common import GB, PAGE, Spread, format_table, fsync_tree, iter_tensors, transformer

CHUNK = 64 << 20
FULL, INCREMENTAL, DISK, TORCH = "ours full", "ours incremental", "disk", "torch.save"
FULL_ASYNC, INCREMENTAL_ASYNC = "ours full, async", "ours incremental, async"


class LoRA(nn.Module):
    """Rank-``rank`` adapters (down, up) for every linear layer of ``base``'s blocks."""

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, layer in base.named_modules():
            if isinstance(layer, nn.Linear):
                key = name.replace(".", "_")
                self.down[key] = nn.Parameter(torch.randn(rank, layer.in_features) * 0.01)
                self.up[key] = nn.Parameter(torch.zeros(layer.out_features, rank))


def make_state(base_gb: float, rank: int) -> dict[str, Any]:
    base = transformer(int(base_gb * GB) // 4)
    base.requires_grad_(False)
    lora = LoRA(base, rank)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-4)
    return {"model": base, "lora": lora, "optimizer": optimizer}


def train_step(state: dict[str, Any], everything: bool = False) -> None:
    """What a training step changes: the adapters and the optimizer's moments; with
    ``everything``, the base model too (a full fine-tune)."""
    if everything:
        with torch.no_grad():
            for p in state["model"].parameters():
                p.add_(1e-3)
    for p in state["lora"].parameters():
        p.grad = torch.randn_like(p) * 1e-3
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)


def nbytes_of(state: dict[str, Any]) -> int:
    return sum(
        t.numel() * t.element_size()
        for obj in state.values()
        for t in iter_tensors(obj.state_dict())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-gb", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=None, help="on the disk to measure")
    parser.add_argument("--all-change", action="store_true",
                        help="the base changes at every step too: what incremental=True "
                        "costs where it saves nothing")
    args = parser.parse_args()

    state = make_state(args.base_gb, args.rank)
    train_step(state)
    total = nbytes_of(state)
    root = Path(tempfile.mkdtemp(prefix="incremental-", dir=args.dir))
    def manager(name: str, asynchronous: bool, incremental: bool) -> CheckpointManager:
        return CheckpointManager(root / name, CheckpointManagerOptions(
            enable_async_checkpointing=asynchronous, max_to_keep=2, incremental=incremental
        ))

    managers = {FULL: manager("full", False, False),
                INCREMENTAL: manager("incremental", False, True),
                FULL_ASYNC: manager("full-async", True, False),
                INCREMENTAL_ASYNC: manager("incremental-async", True, True)}
    for mgr in managers.values():  # the first save writes everything
        mgr.save(0, state)
        mgr.wait_until_finished()
    raw = mmap.mmap(-1, -(-total // PAGE) * PAGE)
    torch.frombuffer(raw, dtype=torch.uint8).random_(256)
    seconds: dict[str, list[float]] = {m: [] for m in (*managers, DISK, TORCH)}
    written: dict[str, list[int]] = {m: [] for m in seconds}
    step = 0

    def ours(mgr: CheckpointManager) -> Callable[[], tuple[int, float | None]]:
        """A save; with async saves, the seconds the training thread waited."""

        def save() -> tuple[int, float | None]:
            mgr.save(step, state)
            mgr.wait_until_finished()
            stats = mgr.last_save_stats()
            assert stats is not None and stats.step == step
            return stats.nbytes, stats.blocking_secs if stats.background_secs else None

        return save

    def disk() -> tuple[int, float | None]:
        path = root / "raw.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        try:
            for pos in range(0, len(raw), CHUNK):
                os.write(fd, memoryview(raw)[pos : pos + CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_tree(root)
        return len(raw), None

    def torch_save() -> tuple[int, float | None]:
        path = root / "torch" / "state.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save({k: v.state_dict() for k, v in state.items()}, path)
        fsync_tree(path.parent)
        return path.stat().st_size, None

    methods = {**{name: ours(mgr) for name, mgr in managers.items()},
               DISK: disk, TORCH: torch_save}
    order = list(methods)
    try:
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                if name in managers:
                    step += 1
                    train_step(state, args.all_change)
                os.sync()
                time.sleep(args.settle)
                t0 = time.perf_counter()
                n, blocking = methods[name]()
                seconds[name].append(time.perf_counter() - t0 if blocking is None else blocking)
                written[name].append(n)
        step += 1  # a last incremental save, untimed, must restore as the state is
        train_step(state, args.all_change)
        for mgr in (managers[INCREMENTAL], managers[INCREMENTAL_ASYNC]):
            mgr.save(step, state)
            restored = mgr.restore(step=step)
            assert restored is not None
            for key in ("model", "lora"):
                for k, v in state[key].state_dict().items():
                    assert torch.equal(restored[key][k], v), f"{key}/{k} differs"
    finally:
        for mgr in managers.values():
            mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    report(seconds, written, total, args)


def report(
    seconds: dict[str, list[float]], written: dict[str, list[int]], total: int,
    args: argparse.Namespace,
) -> None:
    rows = []
    inc = statistics.median(seconds[INCREMENTAL])
    inc_bytes = statistics.median(written[INCREMENTAL])
    for name, times in seconds.items():
        s = Spread.of(times)
        n = statistics.median(written[name])
        rows.append([
            name, f"{s.median:.3f}", f"{s.lo:.3f}-{s.hi:.3f}", f"{n / 1e6:.1f}",
            f"{n / inc_bytes:.0f}x", f"{s.median / inc:.1f}x",
        ])
    base = "changing at every step" if args.all_change else "frozen"
    print(f"LoRA fine-tune: base {args.base_gb} GB {base}, rank {args.rank}, state "
          f"{total / GB:.3f} GB; {args.rounds} rounds, durable saves (async: the training "
          f"thread's wait), medians")
    print(format_table(
        ["method", "median s", "min-max s", "MB written", "bytes vs incr.", "time vs incr."],
        rows,
    ))


if __name__ == "__main__":
    main()
