"""Durable save and cold restore: this library against torch.save, safetensors, DCP,
accelerate, Meta's torch-checkpointing (when installed) and the disk itself, measured in
one run with the methods taking turns.

    .venv/bin/python benchmarks/save_restore.py --size-gb 1 [--rounds 3] [--dir DIR] [--json OUT]
        [--chart SVG]
        [--methods safetensors,DCP]  # peers to run (this library and the disk always run)

Every round runs every method once (starting one further along each round), each in a
fresh directory: durable save (file data and directories fsync'd inside the timing), then
for each restore mode: drop the page cache, restore, touch one byte per page of what
came back (lazy mmaps fault in). Speed ratios are "times as fast": above 1 is faster.
Targets are judged round by round: the two times compared ran in the same round.

Each timed operation starts after ``--settle`` idle seconds (default: 4 per GB of state,
at least 3). On VMs with free page reporting (virtio-balloon) memory freed a moment
earlier is cheap to use again, while memory the host has taken back is slow (page cache:
~2 s per GiB on the VM this was written on), and the host takes it back gradually:
touching 3 GB anew took 1.4 s right after freeing 3 GB, 3.3 s 3 s later, 3.9 s 10 s
later, 4.1 s 20 s later (1 GB freed: no difference). So an operation pays less for its
fresh memory (page cache included) when the one before it freed some, as a buffered save
does when the cold-cache drop frees its page cache: at 3 GB, ``load_file`` settled 3 s
after safetensors' save took 5.69 s, settled 12 s with nothing freed before it 6.96 s,
and a restore without target 4.03 s against 4.41 s (A/B, 4 rounds). Settled 3 s, the
runs of sessions 9 and 10 had our restore without target at 0.79x and 0.76x
``load_file``; settled 12 s, 1.43x and 1.40x. Settling makes every operation pay for
fresh memory the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    GB,
    PAGE,
    PeakRSS,
    Spread,
    default_settle,
    format_table,
    fsync_tree,
    make_cold,
    meta_manager,
    state_nbytes,
    timed,
    touch_pages,
    transformer_with_adam,
    trim_heap,
)

CHUNK = 64 << 20
OURS, DISK = "this library", "disk O_DIRECT"
REUSED = "disk, one buffer"  # the same, from and into one small buffer: a reference
DIRECT_READ = "read O_DIRECT"
PARALLEL_READ = "read O_DIRECT x4"  # 4 requests of 4 MiB in flight: faster for reads
BEST_READ = "faster read, per round"  # the disk's read limit: the faster of the first two
IN_PLACE, NO_TARGET = "restore in place", "restore, no target"
RESUMED = "restore into another model"  # as a restarted job does: memory placed anew


@dataclasses.dataclass
class Method:
    name: str
    save: Callable[[Path], object]
    restores: dict[str, Callable[[Path], object]]
    kind: Literal["ours", "peer", "disk", "memory"] = "peer"
    save_label: str = "durable save"


@dataclasses.dataclass(frozen=True)
class Sample:
    seconds: float
    peak_extra: int  # bytes of RSS above the level before the operation


# ------------------------------------------------------------------ methods


def library(
    model: torch.nn.Module, opt: torch.optim.Optimizer,
    other: tuple[torch.nn.Module, torch.optim.Optimizer],
) -> Method:
    """Saves of ``model`` and ``opt``, restored into them and into ``other``, the same
    model built again: its tensors lie elsewhere in memory, mostly out of step with where
    the file has their bytes, as in a job restarted from the checkpoint."""
    options = CheckpointManagerOptions(enable_async_checkpointing=False)
    reading = dataclasses.replace(options, read_only=True)

    def save(d: Path) -> None:
        with CheckpointManager(d, options) as mgr:
            mgr.save(0, {"model": model, "optimizer": opt}, force=True)

    def in_place(d: Path) -> None:
        with CheckpointManager(d, reading) as mgr:
            mgr.restore({"model": model, "optimizer": opt})

    def no_target(d: Path) -> None:
        with CheckpointManager(d, reading) as mgr:
            touch_pages(mgr.restore())

    def resumed(d: Path) -> None:
        with CheckpointManager(d, reading) as mgr:
            mgr.restore({"model": other[0], "optimizer": other[1]})

    restores: dict[str, Callable[[Path], object]] = {
        IN_PLACE: in_place, RESUMED: resumed, NO_TARGET: no_target}
    return Method(OURS, save, restores, kind="ours")


def peers(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[Method]:
    import safetensors.torch
    from accelerate import Accelerator
    from torch.distributed.checkpoint import state_dict_loader, state_dict_saver

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    def nested() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    def flat() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        for pid, state in opt.state_dict()["state"].items():
            out |= {f"optimizer.{pid}.{k}": v for k, v in state.items()}
        return out

    def torch_save(d: Path) -> None:
        torch.save(nested(), d / "ckpt.pt")
        fsync_tree(d)

    def st_save(d: Path) -> None:
        safetensors.torch.save_file(flat(), d / "ckpt.safetensors")
        fsync_tree(d)

    def dcp_save(d: Path) -> None:
        state_dict_saver.save(nested(), checkpoint_id=d)
        fsync_tree(d)

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model, opt)

    def acc_save(d: Path) -> None:
        accelerator.save_state(str(d))
        fsync_tree(d)

    methods = [
        Method("torch.save", torch_save, {
            "torch.load": lambda d: touch_pages(torch.load(d / "ckpt.pt", weights_only=True))
        }),
        Method("safetensors", st_save, {
            "load_file": lambda d: touch_pages(safetensors.torch.load_file(d / "ckpt.safetensors"))
        }),
        Method("DCP", dcp_save, {
            "dcp.load in place": lambda d: state_dict_loader.load(nested(), checkpoint_id=d)
        }),
        Method("accelerate", acc_save, {
            "load_state": lambda d: accelerator.load_state(str(d))
        }),
    ]
    return methods + torch_checkpointing(nested)


def torch_checkpointing(nested: Callable[[], dict[str, Any]]) -> list[Method]:
    """Meta's torch-checkpointing, synchronous (its async saver stages from CUDA): a save
    and a load in place (buffered writes, see `meta_manager`)."""
    try:
        manager = meta_manager(asynchronous=False)
    except ImportError:
        print("torch-checkpointing is not installed: not measured", file=sys.stderr)
        return []

    def save(d: Path) -> None:
        manager.save(str(d / "ckpt"), nested())
        fsync_tree(d)

    def load(d: Path) -> None:
        manager.load(str(d / "ckpt"), into=nested())

    return [Method("torch-checkpointing", save, {"load in place": load})]


def disk(nbytes: int) -> list[Method]:
    """The limits: the state's ``nbytes`` (rounded up to a page) written with O_DIRECT
    from memory of the state's size, in 64 MiB requests, and read back cold into it,
    where a save takes its bytes from and an in-place restore puts them.

    The same from and into one 64 MiB buffer (`REUSED`) is shown too, but is no limit:
    on this VM the disk moves bytes faster between it and memory the CPU caches hold in
    some spells (reads 1.19x, 1 GB, an A/B of 8 rounds), slower in others (reads
    0.81-0.86x, writes 0.79x), which says more about the VM than about the disk."""
    nbytes = -(-nbytes // PAGE) * PAGE
    state_sized = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT wants
    torch.frombuffer(state_sized, dtype=torch.uint8).random_(256)  # faulted in, like the state
    reused = mmap.mmap(-1, CHUNK)
    reused.write(os.urandom(CHUNK))

    def write(d: Path, flags: int, memory: mmap.mmap) -> None:
        fd = os.open(d / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags)
        try:
            for pos in range(0, nbytes, CHUNK):
                n = min(CHUNK, nbytes - pos)
                at = pos % len(memory)
                assert os.write(fd, memoryview(memory)[at : at + n]) == n
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_tree(d)

    def read(d: Path, flags: int) -> None:
        fd = os.open(d / "raw.bin", os.O_RDONLY | flags)
        try:
            for pos in range(0, nbytes, CHUNK):
                n = min(CHUNK, nbytes - pos)
                assert os.readv(fd, [memoryview(state_sized)[pos : pos + n]]) == n
        finally:
            os.close(fd)

    def read_parallel(d: Path, memory: mmap.mmap, streams: int = 4, piece: int = 4 << 20) -> None:
        fd = os.open(d / "raw.bin", os.O_RDONLY | os.O_DIRECT)

        def stream(i: int) -> None:
            for pos in range(i * piece, nbytes, streams * piece):
                n = min(piece, nbytes - pos)
                at = pos % len(memory)  # requests in flight never share memory
                assert os.preadv(fd, [memoryview(memory)[at : at + n]], pos) == n

        try:
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(stream, range(streams)))
        finally:
            os.close(fd)

    return [
        Method(DISK, partial(write, flags=os.O_DIRECT, memory=state_sized), {
            DIRECT_READ: partial(read, flags=os.O_DIRECT),
            PARALLEL_READ: partial(read_parallel, memory=state_sized),
            "read buffered": partial(read, flags=0),
        }, kind="disk", save_label="write+fsync"),
        Method(REUSED, partial(write, flags=os.O_DIRECT, memory=reused), {
            PARALLEL_READ: partial(read_parallel, memory=reused),
        }, kind="disk", save_label="write+fsync"),
        Method("disk buffered", partial(write, flags=0, memory=state_sized), {}, kind="disk",
               save_label="write+fsync"),
    ]


def fresh_memory(nbytes: int) -> Method:
    """What a restore without target must at least pay: faulting in ``nbytes`` of new memory."""
    return Method("fresh memory", lambda d: torch.ones(nbytes, dtype=torch.uint8), {},
                  kind="memory", save_label="first touch")


# ------------------------------------------------------------------ running


def measure(fn: Callable[[], object], settle: float) -> Sample:
    gc.collect()
    trim_heap()
    time.sleep(settle)
    with PeakRSS() as peak:
        seconds, _ = timed(fn)
    return Sample(seconds, peak.extra)


Results = dict[str, dict[str, list[Sample]]]  # method -> operation -> one sample per round


def run(methods: list[Method], rounds: int, root: Path, settle: float) -> tuple[Results, str]:
    results: Results = {m.name: {op: [] for op in [m.save_label, *m.restores]} for m in methods}
    cold = "none"
    for r in range(rounds):
        shift = r % len(methods)
        for m in methods[shift:] + methods[:shift]:
            d = root / f"{m.name.replace(' ', '_')}-{r}"
            d.mkdir()
            os.sync()
            results[m.name][m.save_label].append(measure(partial(m.save, d), settle))
            for op, restore in m.restores.items():
                cold = make_cold(d)
                results[m.name][op].append(measure(partial(restore, d), settle))
            shutil.rmtree(d)
            os.sync()
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results, cold


# ------------------------------------------------------------------ report


def report(methods: list[Method], results: Results, nbytes: int) -> str:
    kinds = {m.name: m.kind for m in methods}
    reads = results[DISK][DIRECT_READ], results[DISK].get(PARALLEL_READ, [])
    if reads[1]:
        best = [min(a, b, key=lambda s: s.seconds) for a, b in zip(*reads, strict=True)]
        results = {**results, DISK: {**results[DISK], BEST_READ: best}}
    read_limit = BEST_READ if reads[1] else DIRECT_READ
    med = {(name, op): Spread.of([s.seconds for s in ss]).median
           for name, ops in results.items() for op, ss in ops.items()}
    save_ops = {m.name: m.save_label for m in methods}

    def is_save(name: str, op: str) -> bool:
        return save_ops[name] == op

    disk_write, disk_read = med[DISK, "write+fsync"], med[DISK, read_limit]
    best_peer = {
        kind: min((t for (name, op), t in med.items()
                   if kinds[name] == "peer" and is_save(name, op) == (kind == "save")),
                  default=float("nan"))
        for kind in ("save", "restore")
    }
    rows = []
    for (name, op), t in med.items():
        spread = Spread.of([s.seconds for s in results[name][op]])
        save = is_save(name, op)
        rows.append([
            name, op, f"{t:.3f}", f"{spread.lo:.3f}-{spread.hi:.3f}", f"{nbytes / GB / t:.2f}",
            "" if kinds[name] == "memory" else f"{(disk_write if save else disk_read) / t:.2f}",
            "" if kinds[name] in ("disk", "memory")
            else f"{best_peer['save' if save else 'restore'] / t:.2f}",
            f"{max(s.peak_extra for s in results[name][op]) / nbytes:.2f}",
        ])
    table = format_table(
        ["method", "operation", "median s", "min-max s", "GB/s", "x disk", "x best peer",
         "peak extra mem (x state)"], rows)

    def peak(op: str) -> float:
        return max(s.peak_extra for s in results[OURS][op]) / nbytes

    def speedup(other: tuple[str, str], ours: str) -> tuple[Spread, float]:
        """How many times faster ours is: round by round (both ran in the same round, so
        a slow spell of the VM hits both), and as the ratio of the medians."""
        pairs = zip(results[other[0]][other[1]], results[OURS][ours], strict=True)
        return Spread.of([o.seconds / s.seconds for o, s in pairs]), med[other] / med[OURS, ours]

    # (what, the other method's operation, ours, target: ratio >= / >, or "" for a reference)
    speed_checks = [
        ("save: disk O_DIRECT write time / ours", (DISK, "write+fsync"), "durable save",
         ">=", 0.9),
        ("(reference) save: write from one buffer / ours", (REUSED, "write+fsync"),
         "durable save", "", 0.0),
        *[(f"save: {name} time / ours", (name, op), "durable save", ">", 1.0)
          for (name, op) in med if kinds[name] == "peer" and is_save(name, op)],
        ("restore in place: faster disk read time / ours", (DISK, read_limit), IN_PLACE,
         ">=", 0.9),
        ("(reference) restore in place: read into one buffer / ours", (REUSED, PARALLEL_READ),
         IN_PLACE, "", 0.0),
        ("(reference) restore into another model: faster disk read time / ours",
         (DISK, read_limit), RESUMED, "", 0.0),
        ("restore, no target: safetensors load_file time / ours", ("safetensors", "load_file"),
         NO_TARGET, ">=", 1.0),
    ]
    target_rows = []
    for what, other, ours, cmp, want in speed_checks:
        if other not in med:  # left out by --methods
            continue
        rounds, of_medians = speedup(other, ours)
        ok = rounds.median >= want if cmp == ">=" else rounds.median > want
        verdict = [f"{cmp} {want:.2f}", "PASS" if ok else "FAIL"] if cmp else ["", ""]
        target_rows.append([what, f"{rounds.median:.2f}", f"{rounds.lo:.2f}-{rounds.hi:.2f}",
                            f"{of_medians:.2f}", *verdict])
    for what, op in (("save", "durable save"), ("restore in place", IN_PLACE)):
        target_rows.append([f"{what}: peak extra memory (x state)", f"{peak(op):.2f}", "", "",
                            "<= 0.10", "PASS" if peak(op) <= 0.1 else "FAIL"])
    headers = ["ratio", "median of rounds", "min-max of rounds", "of medians", "target", ""]
    return f"{table}\n\nTargets (met by the median of the per-round ratios)\n" \
        f"{format_table(headers, target_rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="state size, in 10^9 bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None,
                        help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated peers to run besides this library and the disk "
                        "(default: all), e.g. safetensors")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--chart", type=Path, default=None, help="write a GB/s chart (SVG) here")
    parser.add_argument("--settle", type=float, default=None,
                        help="idle seconds before each timed operation (default: 4 per GB of "
                        "state, at least 3; see above)")
    args = parser.parse_args()
    if args.settle is None:
        args.settle = default_settle(args.size_gb)

    torch.set_num_threads(os.cpu_count() or 1)
    model, opt = transformer_with_adam(int(args.size_gb * GB))
    other = transformer_with_adam(int(args.size_gb * GB), seed=1)
    nbytes = state_nbytes(model, opt)
    methods = [library(model, opt, other), *peers(model, opt), *disk(nbytes),
               fresh_memory(nbytes)]
    if args.methods:
        chosen = {OURS, DISK, REUSED, *args.methods.split(",")}  # what every ratio needs
        methods = [m for m in methods if m.name in chosen]
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        results, cold = run(methods, args.rounds, root, args.settle)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n_model = len(model.state_dict())
    print(f"state: {nbytes} bytes ({nbytes / GB:.3f} GB): {n_model} float32 model tensors "
          f"({model.embed.num_embeddings} x {model.embed.embedding_dim} embedding, "
          f"{len(model.blocks)} blocks) + Adam exp_avg/exp_avg_sq/step")
    print(f"rounds: {args.rounds}, scratch under {root.parent}, cold cache by "
          f"{cold}{'' if cold == 'drop_caches' else ' (drop_caches NOT permitted)'}, "
          f"settle {args.settle:g} s before each operation, torch threads: "
          f"{torch.get_num_threads()}")
    print("x disk / x best peer: that time / this time (above 1 is faster); save rows vs "
          "O_DIRECT write+fsync from memory of the state's size, restore rows vs the faster "
          "O_DIRECT cold read of the round into it (64 MiB requests one at a time, or 4 MiB "
          "ones 4 in flight)\n")
    print(report(methods, results, nbytes))
    raw = {
        "state_bytes": nbytes, "rounds": args.rounds, "cold_cache": cold,
        "settle_s": args.settle,
        "results": {name: {op: [dataclasses.asdict(s) for s in ss] for op, ss in ops.items()}
                    for name, ops in results.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if args.chart:
        import chart

        title = f"Durable save and cold restore of {nbytes / 1e9:.1f} GB (GB/s, medians)"
        args.chart.write_text(chart.svg(chart.bars(raw), title))


if __name__ == "__main__":
    main()
