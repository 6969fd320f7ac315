"""An async save's snapshot: reused buffers laid out like the files."""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.format.tree import Blob
from checkpointing.snapshot import SnapshotBuffers


def _opts(**kw: Any) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(enable_async_checkpointing=True, **kw)


def _tmp_entries(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith(".tmp")]


def test_snapshot_buffers_are_reused() -> None:
    blobs = [*_blobs(3), Blob("other", "x", torch.ones(5, dtype=torch.bool), [])]
    buffers = SnapshotBuffers()

    def addresses(blobs: list[Blob]) -> list[int]:
        return [b.tensor.data_ptr() for b in buffers.snapshot(blobs)]

    first = addresses(blobs)
    assert addresses(blobs) == first
    assert first[0] % 4096 == 0 and first[1] == first[0] + 4000, "one file's: back to back"
    assert addresses([*blobs[:3], Blob("other", "x", torch.ones(6), [])])[:3] == first[:3]


def test_buffers_a_save_leaves_out_are_freed_off_the_training_thread() -> None:
    """An incremental save that refers to a frozen base instead of copying it freed the
    base's buffers on the training thread: unmapping 3 GB blocked that save 0.67 s
    longer than the saves around it (benchmarks/incremental.py, async rows)."""
    buffers = SnapshotBuffers()
    base, adapter = Blob("base", "w", torch.ones(1000), []), Blob("lora", "a", torch.ones(10), [])
    freed_on: list[str] = []
    copy = buffers.snapshot([base, adapter])[0].tensor
    weakref.finalize(copy, lambda: freed_on.append(threading.current_thread().name))
    del copy
    buffers.snapshot([adapter])  # the base is referred to, not copied
    deadline = time.monotonic() + 10
    while not freed_on and time.monotonic() < deadline:
        time.sleep(0.01)
    assert freed_on == ["checkpointing-free"]


def test_snapshot_of_odd_offsets_and_accelerator_free_layouts_round_trips(
    tmp_path: Path,
) -> None:
    """A 3-byte tensor before a float32 one: that file's buffers are separate."""
    state = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.arange(5.0), "c": torch.zeros(0)}
    with CheckpointManager(tmp_path, _opts()) as mgr:
        mgr.save(1, state)
        mgr.wait_until_finished()
        restored = mgr.restore()
    assert restored is not None and all(torch.equal(restored[k], v) for k, v in state.items())


def _blobs(n: int) -> list[Blob]:
    return [Blob("g", f"t{i}", torch.full((1000,), float(i)), []) for i in range(n)]


def test_failed_snapshot_raises_from_save_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong_buffers(self: SnapshotBuffers, group: str, blobs: list[Blob]) -> Any:
        return {b.key: torch.empty(b.tensor.numel() + 1) for b in blobs}  # copies fail

    with CheckpointManager(tmp_path, _opts()) as mgr:
        mgr.save(1, {"x": torch.ones(10)})
        with monkeypatch.context() as m:
            m.setattr(SnapshotBuffers, "_arena", wrong_buffers)
            with pytest.raises(RuntimeError, match="size"):
                mgr.save(2, {"x": torch.ones(10)})
        mgr.check_for_errors()
        assert mgr.all_steps() == [1] and _tmp_entries(tmp_path) == []
        mgr.save(3, {"x": torch.ones(10)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 3]
