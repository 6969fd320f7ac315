"""Async save: what the training thread pays for a checkpoint, against the floor of copying
the state and against DCP's async_save; and what saving every N steps costs a training loop.

    .venv/bin/python benchmarks/async_save.py --size-gb 1 3 [--rounds 3] [--dir DIR] [--json OUT]

Part 1, for each state size (a GPT-shaped float32 model, ~200 tensors, plus its Adam state).
Every round runs each method once, starting one further along each round:

  ours async   a fresh manager: its first save (which allocates the snapshot buffers), then
               --warm saves. Blocking: until save() returns; durable: until
               wait_until_finished() returns (written, fsync'd, committed).
  ours sync    --warm saves with enable_async_checkpointing=False (durable when they return).
  copy floor   --warm loops of dst.copy_(src) into already-faulted tensors of the same shapes.
  DCP          --warm torch.distributed.checkpoint.async_save calls (gloo group of one
               process; default stager): until it returns, then until .result() and an
               fsync of its directory.
  Meta's torch-checkpointing, when installed (`pip install -e ".[bench]"`): a fresh async
               manager's first save, then --warm saves; until save() has returned and
               its lock() is free (its staging thread has copied the state: only then may
               training change it), then until its future and an fsync. Buffered
               writes: its O_DIRECT writer fails with EINVAL on ext4 here.

Orbax is not measured: it checkpoints JAX arrays only. Each timed operation starts after
--settle idle seconds (default: 4 per GB of state, at least 3; see save_restore.py: on VMs
with free page reporting, memory freed just before is cheaper to reuse for a while, which
would favour whoever allocates right after a free).
Peak extra memory is resident memory above the level just before the operation.

Part 2: a small transformer (nn.TransformerEncoder, AdamW) trained on CPU for
--train-steps steps without checkpoints, saving every --every steps asynchronously, and
synchronously; the three take turns over --train-rounds rounds. Overhead is the mean step
time (save() call included) against the run without checkpoints of the same round. Steps
whose compute overlaps a background save are timed apart from those that do not.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from checkpointing import CheckpointManager, CheckpointManagerOptions

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    GB,
    META,
    META_FIRST,
    PeakRSS,
    Spread,
    default_settle,
    format_table,
    fsync_tree,
    has_meta,
    init_gloo,
    iter_tensors,
    meta_async_saves,
    nested,
    state_nbytes,
    transformer_with_adam,
)

ASYNC = CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=1)
SYNC = dataclasses.replace(ASYNC, enable_async_checkpointing=False)

FIRST, WARM, SYNC_OP, FLOOR, DCP = "async first", "async warm", "sync", "copy floor", "DCP"

LIBC = ctypes.CDLL("libc.so.6")

# scope, ratio, value, target (None: reported, not judged), passed
Check = tuple[str, str, float, str | None, bool]


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed chunks below its (adaptive)
    mmap threshold resident, so without this a new allocation can reuse pages that are
    already counted in RSS, and the peak-memory figures would undercount it."""
    gc.collect()
    LIBC.malloc_trim(0)


# ------------------------------------------------------------ part 1: one save


@dataclasses.dataclass
class SaveBench:
    state: dict[str, Any]  # {"model": ..., "optimizer": ...}
    root: Path
    warm: int
    settle: float
    # "<op> blocking" / "<op> durable" (seconds), "<op> peak" (bytes): one value per sample
    samples: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))

    def measure(self, op: str, start: Callable[[], Callable[[], object]]) -> None:
        """Time ``start()`` (blocking), then the finisher it returns (durable)."""
        release_free_memory()
        os.sync()
        time.sleep(self.settle)
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            finish = start()
            t1 = time.perf_counter()
            finish()
            t2 = time.perf_counter()
        self.samples[f"{op} blocking"].append(t1 - t0)
        self.samples[f"{op} durable"].append(t2 - t0)
        self.samples[f"{op} peak"].append(peak.extra)


def ours(b: SaveBench, asynchronous: bool) -> None:
    saves = [FIRST] + [WARM] * b.warm if asynchronous else [SYNC_OP] * b.warm
    d = b.root / ("async" if asynchronous else "sync")
    with CheckpointManager(d, ASYNC if asynchronous else SYNC) as mgr:
        for step, op in enumerate(saves):

            def start(step: int = step) -> Callable[[], object]:
                mgr.save(step, b.state, force=True)
                return mgr.wait_until_finished

            b.measure(op, start)
    shutil.rmtree(d)


def copy_floor(b: SaveBench) -> None:
    src = list(iter_tensors(nested(b.state)))
    dst = [torch.empty_like(t) for t in src]

    def start() -> Callable[[], object]:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        return lambda: None

    start()  # fault the destination's pages in
    for _ in range(b.warm):
        b.measure(FLOOR, start)


def dcp_async_save(b: SaveBench) -> None:
    for i in range(b.warm):
        d = b.root / f"dcp-{i}"

        def start(d: Path = d) -> Callable[[], object]:
            response = async_save(nested(b.state), checkpoint_id=d)
            future = (response.upload_completion if isinstance(response, AsyncSaveResponse)
                      else response)

            def finish() -> None:
                future.result()
                fsync_tree(d)

            return finish

        b.measure(DCP, start)
        shutil.rmtree(d)


def warm_up(root: Path) -> None:
    """Pay the once-per-process costs (thread pools, planners, imports) before timing."""
    tiny = {"model": nn.Linear(4, 4)}
    response = async_save(nested(tiny), checkpoint_id=root / "warm-dcp")
    assert not isinstance(response, AsyncSaveResponse)  # the default stager stages inline
    response.result()
    with CheckpointManager(root / "warm-ours", ASYNC) as mgr:
        mgr.save(0, tiny)
    for d in ("warm-dcp", "warm-ours"):
        shutil.rmtree(root / d)


def bench_size(size_gb: float, args: argparse.Namespace, root: Path) -> SaveBench:
    model, opt = transformer_with_adam(int(size_gb * GB))
    settle = default_settle(size_gb) if args.settle is None else args.settle
    b = SaveBench({"model": model, "optimizer": opt}, root, args.warm, settle)
    methods: list[Callable[[], None]] = [
        lambda: ours(b, True), lambda: ours(b, False), lambda: copy_floor(b),
        lambda: dcp_async_save(b),
    ]
    if has_meta():
        methods.append(lambda: meta_async_saves(b))
    for r in range(args.rounds):
        for method in methods[r % len(methods):] + methods[: r % len(methods)]:
            method()
        print(f"{size_gb:g} GB: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return b


def report_size(b: SaveBench, label: str) -> tuple[str, list[Check]]:
    nbytes = state_nbytes(b.state["model"], b.state["optimizer"])
    s = b.samples

    def med(key: str) -> float:
        return statistics.median(s[key])

    floor = med(f"{FLOOR} blocking")
    rows = []
    for until, op, name in [
        ("return", FIRST, "ours async, first save (allocates buffers)"),
        ("return", WARM, "ours async, warm save"),
        ("return", FLOOR, "copy floor (dst.copy_(src))"),
        ("return", DCP, "DCP async_save"),
        ("durable", FIRST, "ours async, first save"),
        ("durable", WARM, "ours async, warm save"),
        ("durable", SYNC_OP, "ours sync"),
        ("durable", DCP, "DCP async_save (+ fsync of its tree)"),
        ("return", META_FIRST, "torch-checkpointing async, first save"),
        ("return", META, "torch-checkpointing async, warm save"),
        ("durable", META, "torch-checkpointing async, warm (+ fsync)"),
    ]:
        if f"{op} blocking" not in s:  # not installed
            continue
        spread = Spread.of(s[f"{op} {'blocking' if until == 'return' else 'durable'}"])
        rows.append([
            until, name, f"{spread.median:.3f}", f"{spread.lo:.3f}-{spread.hi:.3f}",
            f"{nbytes / GB / spread.median:.2f}",
            f"{spread.median / floor:.2f}" if until == "return" else "",
            f"{max(s[f'{op} peak']) / nbytes:.2f}",
        ])
    sync_plus_copy = med(f"{SYNC_OP} durable") + floor
    rows.append(["durable", "ours sync + copy floor (medians)", f"{sync_plus_copy:.3f}", "",
                 f"{nbytes / GB / sync_plus_copy:.2f}", "", ""])
    table = format_table(
        ["until", "method", "median s", "min-max s", "GB/s", "x floor",
         "peak extra mem (x state)"], rows)

    def peak(op: str) -> float:
        return max(s[f"{op} peak"]) / nbytes

    warm = med(f"{WARM} blocking")
    dcp_blocking = med(f"{DCP} blocking")
    durable = med(f"{WARM} durable") / sync_plus_copy
    checks: list[Check] = [
        (label, "warm save blocking / copy floor", warm / floor, "<= 1.25", warm / floor <= 1.25),
        (label, "DCP async_save blocking / copy floor", dcp_blocking / floor, None, True),
        (label, "DCP blocking / ours warm (x faster)", dcp_blocking / warm, ">= 1.00",
         dcp_blocking >= warm),
        # Both allocate a copy of the state here; not a target, and it swings run to run.
        (label, "DCP blocking / ours first (x faster)", dcp_blocking / med(f"{FIRST} blocking"),
         None, True),
        (label, "async warm durable / (sync + copy floor)", durable, "<= 1.00", durable <= 1.0),
        (label, "first async save: peak extra mem (x state)", peak(FIRST), "~1 (<= 1.10)",
         peak(FIRST) <= 1.1),
        (label, "warm async save: peak extra mem (x state)", peak(WARM), "~0 (<= 0.05)",
         peak(WARM) <= 0.05),
    ]
    if f"{META} blocking" in s:
        meta = med(f"{META} blocking")
        checks.append(
            (label, "torch-checkpointing blocking / ours warm (x faster)", meta / warm,
             ">= 1.00", meta >= warm)
        )
    n_tensors = len(list(iter_tensors(nested(b.state))))
    head = (f"== state {label}: {nbytes} bytes, {n_tensors} tensors "
            f"({len(b.state['model'].state_dict())} float32 model tensors + Adam state)")
    return f"{head}\n{table}", checks


# --------------------------------------------------------- part 2: training loop

VOCAB, D_MODEL, LAYERS, HEADS, BATCH, SEQ = 4096, 256, 4, 4, 8, 64
WARMUP_STEPS = 5
NONE, ASYNC_MODE, SYNC_MODE = "none", "async", "sync"


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(tokens)))
        return out


@dataclasses.dataclass
class TrainRun:
    step_secs: list[float] = dataclasses.field(default_factory=list)  # save() call included
    compute_secs: list[float] = dataclasses.field(default_factory=list)  # fwd/bwd/step only
    overlapped: list[bool] = dataclasses.field(default_factory=list)  # a save was in flight
    saved: list[bool] = dataclasses.field(default_factory=list)  # save() called this step
    state_bytes: int = 0


def train(mode: str, steps: int, every: int, root: Path) -> TrainRun:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(VOCAB, (BATCH, SEQ + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].flatten()

    def compute() -> None:
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    for _ in range(WARMUP_STEPS):
        compute()
    run = TrainRun(state_bytes=state_nbytes(model, opt))
    mgr = None if mode == NONE else CheckpointManager(
        root / f"train-{mode}", ASYNC if mode == ASYNC_MODE else SYNC)
    gc.collect()
    os.sync()
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            busy = mgr is not None and mgr.is_saving_in_progress()
            compute()
            t1 = time.perf_counter()
            busy = busy or (mgr is not None and mgr.is_saving_in_progress())
            saved = mgr is not None and i % every == 0  # each save followed by every-1 steps
            if saved and mgr is not None:
                mgr.save(i, {"model": model, "optimizer": opt}, force=True)
            t2 = time.perf_counter()
            run.step_secs.append(t2 - t0)
            run.compute_secs.append(t1 - t0)
            run.overlapped.append(busy)
            run.saved.append(saved)
    finally:
        if mgr is not None:
            mgr.close()
    shutil.rmtree(root / f"train-{mode}", ignore_errors=True)
    return run


def bench_train(args: argparse.Namespace, root: Path) -> dict[str, list[TrainRun]]:
    modes = [NONE, ASYNC_MODE, SYNC_MODE]
    runs: dict[str, list[TrainRun]] = {m: [] for m in modes}
    for r in range(args.train_rounds):
        for mode in modes[r % 3:] + modes[: r % 3]:
            runs[mode].append(train(mode, args.train_steps, args.every, root))
        print(f"training: round {r + 1}/{args.train_rounds} done", file=sys.stderr, flush=True)
    return runs


def report_train(runs: dict[str, list[TrainRun]], args: argparse.Namespace
                 ) -> tuple[str, list[Check]]:
    base = [statistics.mean(run.step_secs) for run in runs[NONE]]
    rows, overhead = [], {}
    for mode, label in [(NONE, "no checkpoints"), (ASYNC_MODE, f"async, every {args.every}"),
                        (SYNC_MODE, f"sync, every {args.every}")]:
        means = [statistics.mean(run.step_secs) for run in runs[mode]]
        step = Spread.of([m * 1e3 for m in means])
        over = Spread.of([100 * (m / b - 1) for m, b in zip(means, base, strict=True)])
        overhead[mode] = over.median
        calls = [t - c for run in runs[mode]
                 for t, c, saved in zip(run.step_secs, run.compute_secs, run.saved, strict=True)
                 if saved]
        rows.append([
            label, f"{step.median:.1f}", f"{step.lo:.1f}-{step.hi:.1f}",
            f"{over.median:+.1f}", f"{over.lo:+.1f}..{over.hi:+.1f}",
            f"{statistics.median(calls) * 1e3:.1f}" if calls else "",
        ])
    table = format_table(["checkpointing", "mean step ms", "min-max", "overhead %",
                          "min..max %", "save() call ms (median)"], rows)

    overlapped = [c for run in runs[ASYNC_MODE]
                  for c, o in zip(run.compute_secs, run.overlapped, strict=True) if o]
    clean = [c for run in runs[ASYNC_MODE]
             for c, o in zip(run.compute_secs, run.overlapped, strict=True) if not o]
    slowdown = statistics.mean(overlapped) / statistics.mean(clean) if overlapped else float("nan")
    run0 = runs[NONE][0]
    head = (f"== training loop: TinyLM (d_model {D_MODEL}, {LAYERS} layers, vocab {VOCAB}), "
            f"batch {BATCH}x{SEQ} tokens, AdamW, state {run0.state_bytes / 1e6:.1f} MB, "
            f"{args.train_steps} steps (+{WARMUP_STEPS} untimed), {args.train_rounds} rounds, "
            f"torch threads {torch.get_num_threads()}")
    inflight = (f"async run, compute of steps overlapping a background save: "
                f"{len(overlapped)} steps, mean "
                f"{statistics.mean(overlapped) * 1e3 if overlapped else float('nan'):.1f} ms vs "
                f"{statistics.mean(clean) * 1e3:.1f} ms for the other {len(clean)} steps "
                f"(x{slowdown:.2f})")
    scope = "training"
    checks: list[Check] = [
        (scope, f"async every {args.every}: step-time overhead %", overhead[ASYNC_MODE],
         "<= 5.0", overhead[ASYNC_MODE] <= 5.0),
        (scope, f"sync every {args.every}: step-time overhead %", overhead[SYNC_MODE], None,
         True),
        (scope, "step time while a save is in flight / otherwise", slowdown, None, True),
    ]
    return f"{head}\n{table}\n{inflight}", checks


# ------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, nargs="*", default=[1.0],
                        help="state sizes, in 10^9 bytes (none: skip part 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=3,
                        help="warm saves (and floor copies, DCP saves) per method per round")
    parser.add_argument("--settle", type=float, default=None,
                        help="idle seconds before each timed save (default: 4 per GB of "
                        "state, at least 3; see above)")
    parser.add_argument("--train-steps", type=int, default=300, help="0: skip part 2")
    parser.add_argument("--every", type=int, default=50, help="save every N training steps")
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None,
                        help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ckpt-async-", dir=args.dir))
    sections: list[str] = []
    checks: list[Check] = []
    raw: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    try:
        if args.size_gb:
            init_gloo()
            warm_up(root)
            for size in args.size_gb:
                b = bench_size(size, args, root)
                text, size_checks = report_size(b, f"{size:g} GB")
                sections.append(text)
                checks += size_checks
                raw["sizes"][f"{size:g}"] = b.samples
                del b
                gc.collect()
            dist.destroy_process_group()
        if args.train_steps:
            runs = bench_train(args, root)
            text, train_checks = report_train(runs, args)
            sections.append(text)
            checks += train_checks
            raw["train"] = {m: [dataclasses.asdict(r) for r in rs] for m, rs in runs.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    settle = "4 s per GB, at least 3 s" if args.settle is None else f"{args.settle:g} s"
    print(f"scratch under {root.parent}; {args.rounds} rounds x {args.warm} warm samples per "
          f"method, settle {settle}, torch threads {torch.get_num_threads()}. "
          f"Orbax: not measured (JAX-only).\n")
    print("\n\n".join(sections))
    print("\nSummary (ratios of medians)")
    print(format_table(["scope", "ratio", "value", "target", ""], [
        [scope, what, f"{value:.2f}", target or "(info)", "" if target is None else
         "PASS" if ok else "FAIL"] for scope, what, value, target, ok in checks]))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
