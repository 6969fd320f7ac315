"""Saves and restores of a 2-process job: this library against plain DCP, one process,
and the disk, measured in one run with the methods taking turns.

    .venv/bin/python benchmarks/distributed.py --size-gb 1 [--rounds 3] [--dir DIR]

The script starts 2 gloo processes of itself. The state is ~50 float32 tensors of
``--size-gb`` in all, as DTensors sharded by rows over both processes (FSDP-style),
or whole on every process (DDP-style: replicated, written once by the primary). Each
round runs every method once, in a fresh directory: a durable save, then, after the page
cache is dropped, an in-place restore. Times are wall times of the whole job (barrier
before, barrier after), each after a full garbage collection (as in save_restore.py: a
young process otherwise owes its first one to whichever operation triggers it). Physical
limit: both processes writing (reading) their half of the bytes with O_DIRECT at once,
from (into) one reused buffer; and from (into) the sharded state's own tensors, as a
save's (an in-place restore's) bytes must come from (land in) the state's memory.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from checkpointing import CheckpointManager, CheckpointManagerOptions, SingleProcess

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    GB,
    Spread,
    default_settle,
    format_table,
    launch_gloo,
    make_cold,
    size_options,
)

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)
READ = CheckpointManagerOptions(read_only=True)
CHUNK = 64 << 20
ALIGN = 4096  # of direct I/O's memory, a multiple of what any filesystem asks
SINGLE = "ours, 1 process (the other idle)"
DISK = "disk O_DIRECT, 2 processes"
DISK_STATE_MEMORY = "disk O_DIRECT, the shards' own memory, 2 processes"


def states(nbytes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sharded, replicated) states of ``nbytes`` each, in ~50 tensors of 1024 columns."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = max(2, nbytes // 50 // 4096 // 2 * 2)
    g = torch.Generator().manual_seed(0)
    full = {f"layer{i}.weight": torch.randn(rows, 1024, generator=g) for i in range(50)}
    sharded: dict[str, torch.Tensor] = {
        k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()
    }
    return sharded, full


def raw(nbytes: int, tensors: list[torch.Tensor]) -> tuple[Callable[[Path], None], ...]:
    """O_DIRECT write+fsync of this process's ``nbytes`` and their read, from and into
    one reused buffer (the disk's speed); and from and into ``tensors`` themselves (this
    process's shards: what a save and an in-place restore must do, as every byte comes
    from, or lands in, the state's own memory), each tensor's bytes from its first
    aligned address on, back to back in the file."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    view = memoryview(buf)
    in_buffer = [view[: min(CHUNK, nbytes - p)] for p in range(0, nbytes, CHUNK)]
    in_tensors = []
    for t in tensors:
        head = -t.data_ptr() % ALIGN
        flat = t.detach().reshape(-1).view(torch.uint8).numpy()
        whole = memoryview(flat).cast("B")  # type: ignore[arg-type]
        aligned = whole[head : head + (len(whole) - head) // ALIGN * ALIGN]
        in_tensors += [aligned[p : p + CHUNK] for p in range(0, len(aligned), CHUNK)]

    def write(d: Path, views: list[memoryview] = in_buffer) -> None:
        fd = os.open(d / f"raw{dist.get_rank()}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            for v in views:
                os.write(fd, v)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(d: Path, views: list[memoryview] = in_buffer) -> None:
        fd = os.open(d / f"raw{dist.get_rank()}", os.O_RDONLY | os.O_DIRECT)
        try:
            for v in views:
                os.readv(fd, [v])
        finally:
            os.close(fd)

    return write, read, lambda d: write(d, in_tensors), lambda d: read(d, in_tensors)


def worker(size_gb: float, rounds: int, settle: float, root: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    warnings.filterwarnings("ignore")
    nbytes = int(size_gb * GB)
    sharded, full = states(nbytes)
    state_bytes = sum(t.numel() * 4 for t in full.values())
    share = state_bytes // dist.get_world_size() // 4096 * 4096
    local = [t.to_local() for t in sharded.values()]  # type: ignore[attr-defined]
    raw_write, raw_read, raw_write_from, raw_read_into = raw(share, local)

    # Managers are opened before the timing (a run opens one once) and closed after.
    def ours_save(state: dict[str, torch.Tensor]) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            mgr = managers[d]
            if mgr is not None:
                mgr.save(0, {"model": state})
        return run

    def ours_restore(state: dict[str, torch.Tensor]) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            mgr = managers[d]
            if mgr is not None:
                mgr.restore({"model": state})
        return run

    def manager(d: Path, op: str, name: str) -> CheckpointManager | None:
        if not name.startswith("ours"):
            return None
        if name == SINGLE and rank != 0:
            return None
        coordinator = SingleProcess() if name == SINGLE else None
        return CheckpointManager(d, SYNC if op == "save" else READ, coordinator=coordinator)

    methods: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {
        "ours, 2 ranks, sharded (FSDP)": (ours_save(sharded), ours_restore(sharded)),
        "DCP save/load, 2 ranks, sharded": (
            lambda d: dcp_save(sharded, storage_writer=FileSystemWriter(d)),
            lambda d: dcp_load(sharded, storage_reader=FileSystemReader(d))),
        "ours, 2 ranks, replicated (DDP)": (ours_save(full), ours_restore(full)),
        SINGLE: (ours_save(full), ours_restore(full)),
        DISK: (raw_write, raw_read),
        DISK_STATE_MEMORY: (raw_write_from, raw_read_into),
    }
    times: dict[tuple[str, str], list[float]] = {}
    managers: dict[Path, CheckpointManager | None] = {}
    for r in range(rounds):
        names = list(methods)
        for name in names[r % len(names):] + names[: r % len(names)]:
            d = root / f"{r}-{names.index(name)}"
            d.mkdir(exist_ok=True)
            for op, fn in zip(("save", "restore"), methods[name], strict=True):
                managers[d] = manager(d, op, name)
                if op == "restore" and rank == 0:
                    make_cold(d)
                gc.collect()  # as save_restore.py: no collection owed from earlier work
                dist.barrier()
                time.sleep(settle)
                dist.barrier()
                t0 = time.perf_counter()
                fn(d)
                dist.barrier()
                times.setdefault((name, op), []).append(time.perf_counter() - t0)
                mgr = managers.pop(d)
                if mgr is not None:
                    mgr.close()
            dist.barrier()
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
    if rank == 0:
        report(times, state_bytes, rounds, settle)
    dist.destroy_process_group()


def report(
    times: dict[tuple[str, str], list[float]], nbytes: int, rounds: int, settle: float
) -> None:
    limit = {op: Spread.of(times[(DISK, op)]).median for op in ("save", "restore")}
    dcp = {op: Spread.of(times[("DCP save/load, 2 ranks, sharded", op)]).median
           for op in ("save", "restore")}
    rows = []
    for (name, op), ts in times.items():
        s = Spread.of(ts)
        rows.append([
            f"{name}: {'durable save' if op == 'save' else 'cold restore in place'}",
            f"{s.median:.3f}", f"{s.lo:.3f}-{s.hi:.3f}", f"{nbytes / s.median / GB:.2f}",
            f"{limit[op] / s.median:.2f}", f"{dcp[op] / s.median:.2f}",
        ])
    rows.sort(key=lambda row: ("restore" in row[0], row[0]))
    print(f"state: {nbytes} bytes ({nbytes / GB:.3f} GB) in 50 float32 tensors; 2 gloo "
          f"processes; {rounds} rounds, methods interleaved; page cache dropped before "
          f"restores; settle {settle:g} s")
    print("x disk / x DCP: that time / this time (above 1 is faster)\n")
    print(format_table(
        ["method", "median s", "min-max s", "GB/s", "x disk", "x DCP"], rows))
    for op, against in (("save", "write from"), ("restore", "read into")):
        own = Spread.of(times[(DISK_STATE_MEMORY, op)]).median
        print(f"\n{op}s against the disk's {against} the shards' own memory ({own:.3f} s):")
        for (name, op_), ts in times.items():
            if op_ == op and name.startswith("ours"):
                print(f"  {name}: {own / Spread.of(ts).median:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.settle is None:
        args.settle = default_settle(args.size_gb)
    if args.worker is not None:
        worker(args.size_gb, args.rounds, args.settle, args.worker)
        return
    root = Path(tempfile.mkdtemp(prefix="ckpt-dist-bench-", dir=args.dir))
    try:
        sys.exit(max(launch_gloo(2, [
            __file__, "--size-gb", str(args.size_gb), "--rounds", str(args.rounds),
            "--settle", str(args.settle), "--worker", str(root)])))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
