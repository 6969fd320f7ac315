"""Resharded restores: DTensors saved by 2 processes, restored by 1, 2 and 4 processes,
each into a layout of its own, against the restore into the layout they were saved in.

    .venv/bin/python benchmarks/reshard.py --size-gb 1 [--rounds 3] [--dir DIR]

A 2-process gloo job saves ~50 float32 tensors of ``--size-gb`` in all, sharded by rows.
Each round then starts one job of each size, taking turns at going first, that restores
the step cold (page cache dropped) in place: into DTensors sharded by rows over its
processes, or, in one process without torch.distributed, into whole tensors (an
evaluation job). Times are of the restore in the whole job (barrier before and after),
not of starting processes or building the target, after a full garbage collection (as
in save_restore.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from checkpointing import CheckpointManager, CheckpointManagerOptions

sys.path.insert(0, str(Path(__file__).parent))
from _common import GB, Spread, default_settle, format_table, launch_gloo, make_cold, size_options

TENSORS = 50
COLUMNS = 1024
SAVED_ON = 2
WORLDS = (1, 2, 4)


def rows_for(nbytes: int) -> int:
    """Rows of each tensor: ``nbytes`` in all, divisible by every job size."""
    return max(4, nbytes // TENSORS // (COLUMNS * 4) // 4 * 4)


def state(rows: int, world: int, fill: bool) -> dict[str, torch.Tensor]:
    """The tensors, sharded by rows over ``world`` processes (whole when 1); random
    (the same in every process) when ``fill``, else zeros."""
    g = torch.Generator().manual_seed(0)

    def make() -> torch.Tensor:
        return torch.randn(rows, COLUMNS, generator=g) if fill else torch.zeros(rows, COLUMNS)

    if world == 1:
        return {f"layer{i}.weight": make() for i in range(TENSORS)}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {f"layer{i}.weight": distribute_tensor(make(), mesh, [Shard(0)])
            for i in range(TENSORS)}


def worker(job: str, directory: Path, rows: int, settle: float, out: Path) -> None:
    """One process of a job: ``save`` (2 processes) or ``restore`` (1, 2 or 4)."""
    warnings.filterwarnings("ignore")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    if job == "save":
        with CheckpointManager(directory, CheckpointManagerOptions(
                enable_async_checkpointing=False)) as mgr:
            mgr.save(0, {"model": state(rows, world, fill=True)})
    else:
        target = state(rows, world, fill=False)
        with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as mgr:
            if rank == 0:
                make_cold(directory)
            gc.collect()  # as save_restore.py: no collection owed from building the target
            barrier()
            time.sleep(settle)
            barrier()
            t0 = time.perf_counter()
            mgr.restore({"model": target})
            barrier()
            elapsed = time.perf_counter() - t0
        if rank == 0:
            out.write_text(json.dumps(elapsed))
    barrier()
    sys.stdout.flush()
    os._exit(0)  # skip tearing down gloo groups (see tests/distributed/worker.py)


def launch(world: int, job: str, directory: Path, rows: int, settle: float, out: Path) -> None:
    codes = launch_gloo(world, [
        __file__, "--worker", job, "--rows", str(rows), "--settle", str(settle),
        "--out", str(out), "--dir", str(directory)])
    if any(codes):
        sys.exit(f"the {world}-process {job} job failed: exit codes {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser)
    parser.add_argument("--worker", choices=("save", "restore"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.dir, args.rows, args.settle, args.out)
        return
    settle = default_settle(args.size_gb) if args.settle is None else args.settle
    rows = rows_for(int(args.size_gb * GB))
    nbytes = rows * COLUMNS * 4 * TENSORS
    root = Path(tempfile.mkdtemp(prefix="ckpt-reshard-bench-", dir=args.dir))
    try:
        directory, out = root / "ckpt", root / "elapsed.json"
        launch(SAVED_ON, "save", directory, rows, settle, out)
        times: dict[int, list[float]] = {w: [] for w in WORLDS}
        for r in range(args.rounds):
            for world in WORLDS[r % len(WORLDS):] + WORLDS[: r % len(WORLDS)]:
                launch(world, "restore", directory, rows, settle, out)
                times[world].append(json.loads(out.read_text()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = Spread.of(times[SAVED_ON]).median
    rows_out = []
    for world in WORLDS:
        s = Spread.of(times[world])
        layout = "same layout" if world == SAVED_ON else "resharded"
        rows_out.append([
            f"restored on {world} process{'es' if world > 1 else ''} ({layout})",
            f"{s.median:.3f}", f"{s.lo:.3f}-{s.hi:.3f}", f"{nbytes / s.median / GB:.2f}",
            f"{s.median / same:.2f}",
        ])
    print(f"state: {nbytes} bytes ({nbytes / GB:.3f} GB) in {TENSORS} float32 tensors "
          f"sharded by rows, saved by {SAVED_ON} gloo processes; cold in-place restores, "
          f"{args.rounds} rounds, job sizes taking turns; settle {settle:g} s")
    print(f"x same layout: this time / the {SAVED_ON}-process restore's (target <= 1.2)\n")
    print(format_table(["restore", "median s", "min-max s", "GB/s", "x same layout"], rows_out))


if __name__ == "__main__":
    main()
