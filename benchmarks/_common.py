"""Helpers shared by the benchmarks: timing, cold caches, memory peaks, tables, states."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

GB = 10**9
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ timing


def default_settle(size_gb: float) -> float:
    """Idle seconds before a timed operation on a state of ``size_gb``: 4 per GB, at
    least 3. This VM's host takes freed memory back over seconds (see save_restore.py),
    so memory freed just before is cheaper to reuse; the pause must grow with the size."""
    return max(3.0, 4.0 * size_gb)


def size_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time one state of ``--size-gb`` in rounds."""
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--settle", type=float, default=None,
                        help="idle seconds before each timed operation (default: 4 per GB "
                        "of state, at least 3; see save_restore.py)")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclasses.dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


# ------------------------------------------------------------ page cache


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def evict(root: Path) -> None:
    """Drop the (clean) cached pages of every file under ``root``, without privileges."""
    for path in files_under(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_cold(root: Path) -> str:
    """Make the files under ``root`` uncached; returns how ("drop_caches" or "fadvise")."""
    if drop_caches():
        return "drop_caches"
    evict(root)
    return "fadvise"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    for path in [*files_under(root), *(p for p in root.rglob("*") if p.is_dir()), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- memory


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise), so that an
    operation's RSS growth counts its allocations even where earlier ones were freed."""
    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).malloc_trim(0)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak resident memory above the level at entry (``extra`` bytes, set on exit).

    Takes the larger of a thread sampling RSS every ``interval`` seconds and VmHWM,
    which catches short spikes once reset through /proc/self/clear_refs.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.extra = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._hwm_ok = _reset_hwm()
        self.baseline = self._peak = rss()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, rss(), _hwm() if self._hwm_ok else 0)
        self.extra = max(0, peak - self.baseline)


# ---------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---------------------------------------------------------------- states


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class Transformer(nn.Module):
    """Parameters shaped like a GPT: embedding, ``layers`` blocks, final LayerNorm."""

    def __init__(self, vocab: int, d: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


def transformer(params: int, layers: int = 16, seed: int = 0) -> Transformer:
    """A float32 model of about ``params`` parameters. About 80% of them sit in the
    blocks (d a multiple of 64); the embedding's vocabulary takes the rest."""
    torch.manual_seed(seed)
    d = max(64, math.isqrt(int(0.8 * params / (12 * layers))) // 64 * 64)
    vocab = max(1, (params - layers * (12 * d * d + 13 * d) - 2 * d) // d)
    return Transformer(vocab, d, layers)


def transformer_with_adam(
    nbytes: int, layers: int = 16, seed: int = 0
) -> tuple[Transformer, torch.optim.Adam]:
    """A float32 model plus materialized Adam state (exp_avg, exp_avg_sq) of about
    ``nbytes`` in all: 12 bytes per parameter."""
    model = transformer(nbytes // 12, layers, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from iter_tensors(value)


def state_nbytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's and the optimizer's tensors."""
    tensors = [*iter_tensors(model.state_dict()), *iter_tensors(optimizer.state_dict())]
    return sum(t.numel() * t.element_size() for t in tensors)


def touch_pages(obj: Any) -> int:
    """Read one byte per page of every tensor in ``obj`` (faults in lazy mmaps)."""
    total = 0
    for t in iter_tensors(obj):
        if t.numel():
            total += int(t.detach().reshape(-1).view(torch.uint8)[::PAGE].sum())
    return total


def nested(state: dict[str, Any]) -> dict[str, Any]:
    """``{"model": model, ...}`` as plain dicts of state_dicts, the form the peers take
    (DCP's pinned stager cannot copy a module's OrderedDict: its deepcopy has no rule for
    the class object that OrderedDict reduces to)."""
    return {name: dict(obj.state_dict()) for name, obj in state.items()}


# ---------------------------------------------------------------- peers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_gloo(world: int, args: Sequence[str]) -> list[int]:
    """Run ``world`` processes of ``python args`` as one job on loopback, with the
    environment torchrun gives (and one OpenMP thread each); their exit codes."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "OMP_NUM_THREADS": "1"},
        )
        for rank in range(world)
    ]
    return [p.wait() for p in procs]


def init_gloo() -> None:
    """A process group of one, which DCP's async_save plans through."""
    import torch.distributed as dist

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def has_meta() -> bool:
    """Whether Meta's torch-checkpointing is installed (``pip install -e ".[bench]"``)."""
    import importlib.util

    return importlib.util.find_spec("torch_checkpointing") is not None


def meta_manager(asynchronous: bool) -> Any:
    """A manager of Meta's torch-checkpointing (ImportError when it is not installed).
    Buffered writes, fsync'd like the other peers': its default O_DIRECT writer fails on
    ext4 (EINVAL on unaligned writes)."""
    from torch_checkpointing import CheckpointManager as MetaManager
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    config = MetaManager.Config.with_async_save() if asynchronous else (
        MetaManager.Config.with_sync_save()
    )
    storage = LocalFileSystemStorageConfig(use_direct_io=False)
    return MetaManager(dataclasses.replace(config, storage_config=storage))


META_FIRST, META = "torch-checkpointing first", "torch-checkpointing warm"


class AsyncBench(Protocol):
    """What `meta_async_saves` needs of a benchmark of async saves."""

    state: dict[str, Any]
    root: Path
    warm: int

    def measure(self, op: str, start: Callable[[], Callable[[], object]]) -> None: ...


def meta_async_saves(b: AsyncBench) -> None:
    """Async saves of Meta's torch-checkpointing, staging in this process and writing in
    its own: the first (`META_FIRST`), then ``b.warm`` more (`META`)."""
    manager = meta_manager(asynchronous=True)
    for i in range(b.warm + 1):
        d = b.root / f"meta-{i}"

        def start(d: Path = d) -> Callable[[], object]:
            return meta_async_start(manager, d, nested(b.state))

        b.measure(META_FIRST if i == 0 else META, start)
        shutil.rmtree(d)
    manager.close()


def meta_async_start(manager: Any, directory: Path, state: dict[str, Any]) -> Callable[[], None]:
    """Start an async save of torch-checkpointing; return when the training thread may
    change the state again, with the function that waits until it is durable. Its
    save() returns while a thread still copies the state; training may change it only
    once ``lock()`` is free (its documented guard for optimizer.step()), so that wait is
    part of what a save costs."""
    future = manager.save(str(directory), state)
    assert future is not None
    with manager.lock():
        pass

    def finish() -> None:
        future.result()
        fsync_tree(directory)

    return finish
