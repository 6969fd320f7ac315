"""Async save from CUDA tensors: what the training thread pays, against the floor.

    python benchmarks/gpu.py [--size-gb 4] [--rounds 3] [--warm 2] [--dir DIR] [--json OUT]

One unattended run of a few minutes on a GPU machine; on a machine without CUDA it says
so and exits 0. The state is a GPT-shaped float32 model with its Adam state, on the GPU.
Each round runs every method once, starting one further along each round:

  pinned D2H   copies of every tensor into pinned host buffers allocated beforehand
               (non-blocking copies, then one synchronize): the floor of any save that
               must hand the GPU memory back to training.
  ours         a fresh async manager's first save (which allocates its pinned buffers),
               then --warm saves. Blocking: until save() returns (the state may change
               from then on); durable: until wait_until_finished() returns. Then one
               more save whose state changes right after save() returns: restored, it
               must equal the state as it was.
  DCP          torch.distributed.checkpoint.async_save with its default stager, and with
               a DefaultStager of pinned, cached buffers (async staging): blocking until
               async_save has returned and staging is complete.
  Meta's torch-checkpointing (when installed): blocking until save() has returned and
               its lock() is free; durable until its future and an fsync.

Durable times include an fsync of what was written. Ratios are medians over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (
    GB,
    META,
    META_FIRST,
    Spread,
    format_table,
    fsync_tree,
    has_meta,
    init_gloo,
    iter_tensors,
    meta_async_saves,
    nested,
    transformer_with_adam,
)

from checkpointing import CheckpointManager, CheckpointManagerOptions

FLOOR, FIRST, WARM = "pinned D2H", "ours first", "ours warm"
DCP, DCP_PINNED = "DCP default", "DCP pinned stager"


@dataclasses.dataclass
class Bench:
    state: dict[str, Any]  # {"model": ..., "optimizer": ...} on the GPU
    root: Path
    warm: int
    samples: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))

    def measure(self, op: str, start: Callable[[], Callable[[], object]]) -> None:
        """Time ``start()`` (blocking), then the finisher it returns (durable)."""
        torch.cuda.synchronize()
        time.sleep(0.5)
        t0 = time.perf_counter()
        finish = start()
        t1 = time.perf_counter()
        finish()
        t2 = time.perf_counter()
        self.samples[f"{op} blocking"].append(t1 - t0)
        self.samples[f"{op} durable"].append(t2 - t0)


def pinned_floor(b: Bench) -> None:
    src = [t for t in iter_tensors(nested(b.state)) if t.is_cuda]
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in src]

    def start() -> Callable[[], object]:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        return lambda: None

    start()  # fault the pages in
    for _ in range(b.warm):
        b.measure(FLOOR, start)


def ours(b: Bench) -> None:
    d = b.root / "ours"
    options = CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=1)
    with CheckpointManager(d, options) as mgr:
        for step in range(b.warm + 1):

            def start(step: int = step) -> Callable[[], object]:
                mgr.save(step, b.state, force=True)
                return mgr.wait_until_finished

            b.measure(FIRST if step == 0 else WARM, start)
        check_snapshot(mgr, b.state["model"], b.warm + 1)
    shutil.rmtree(d)


def check_snapshot(mgr: CheckpointManager, model: torch.nn.Module, step: int) -> None:
    """The step holds the state as it was when save() returned, although training changes
    it right after (every tensor negated in place, then negated back: bit-exact)."""
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    mgr.save(step, {"model": model}, force=True)
    with torch.no_grad():
        for p in model.parameters():
            p.neg_()
        mgr.wait_until_finished()
        for p in model.parameters():
            p.neg_()
    restored = mgr.restore(step=step)
    assert restored is not None
    for k, v in expected.items():
        assert torch.equal(restored["model"][k], v), f"step {step}: {k} differs"


def dcp(b: Bench, pinned: bool) -> None:
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

    stager = None
    if pinned:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(True, False, True, True))
    for i in range(b.warm):
        d = b.root / f"dcp-{i}"

        def start(d: Path = d) -> Callable[[], object]:
            response = async_save(nested(b.state), checkpoint_id=d, async_stager=stager)
            if isinstance(response, AsyncSaveResponse):
                response.staging_completion.result()  # only then may training go on
                future = response.upload_completion
            else:
                future = response

            def finish() -> None:
                future.result()
                fsync_tree(d)

            return finish

        b.measure(DCP_PINNED if pinned else DCP, start)
        shutil.rmtree(d)
    if stager is not None:
        stager.close()


def gpu_state(size_gb: float) -> dict[str, Any]:
    model, optimizer = transformer_with_adam(int(size_gb * GB))
    model.cuda()  # the same Parameter objects: the optimizer's state keys still hold
    for per_param in optimizer.state.values():
        for k, v in per_param.items():
            if k != "step":
                per_param[k] = v.cuda()
    return {"model": model, "optimizer": optimizer}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="on the disk to measure")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: benchmarks/gpu.py measures nothing here")
        return 0
    init_gloo()
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=args.dir or Path.cwd()))
    b = Bench(gpu_state(args.size_gb), root, args.warm)
    nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(nested(b.state)))
    methods: dict[str, Callable[[], None]] = {
        FLOOR: lambda: pinned_floor(b),
        "ours": lambda: ours(b),
        DCP: lambda: dcp(b, False),
        DCP_PINNED: lambda: dcp(b, True),
    }
    if has_meta():
        methods["torch-checkpointing"] = lambda: meta_async_saves(b)
    failed: dict[str, str] = {}  # a peer that fails is reported, and the rest measured
    order = list(methods)
    try:
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                if name in failed:
                    continue
                try:
                    methods[name]()
                except Exception as e:
                    failed[name] = f"{type(e).__name__}: {e}"[:200]
                    shutil.rmtree(root, ignore_errors=True)
                    root.mkdir()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(b, nbytes, args)
    for name, error in failed.items():
        print(f"{name} failed: {error}")
    return 0


def report(b: Bench, nbytes: int, args: argparse.Namespace) -> None:
    floor = statistics.median(b.samples[f"{FLOOR} blocking"])
    ops = [FLOOR, FIRST, WARM, DCP, DCP_PINNED, META_FIRST, META]
    rows = []
    for op in ops:
        if f"{op} blocking" not in b.samples:
            continue
        blocking = Spread.of(b.samples[f"{op} blocking"])
        durable = Spread.of(b.samples[f"{op} durable"])
        rows.append([
            op,
            f"{blocking.median * 1e3:.0f} ({blocking.lo * 1e3:.0f}-{blocking.hi * 1e3:.0f})",
            f"{blocking.median / floor:.2f}x",
            f"{nbytes / blocking.median / GB:.1f}",
            "" if op == FLOOR else f"{durable.median:.2f} ({durable.lo:.2f}-{durable.hi:.2f})",
        ])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, state "
          f"{nbytes / GB:.2f} GB on the GPU, {args.rounds} rounds, medians (min-max)")
    print(format_table(
        ["method", "blocking ms", "vs pinned D2H", "GB/s blocking", "until durable s"], rows
    ))
    if args.json:
        args.json.write_text(json.dumps({k: list(v) for k, v in b.samples.items()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
