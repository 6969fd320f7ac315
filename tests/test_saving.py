"""The save path: async saves (the state copied at once, written after), failures
surfaced once, timeouts, memory, a save in flight at exit, identical files either way."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from checkpointing import (
    CheckpointError,
    CheckpointManager,
    CheckpointManagerOptions,
    DiskFullError,
)
from checkpointing.format import tensors, verify


def _opts(**kw: Any) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(enable_async_checkpointing=True, **kw)


def _tmp_entries(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith(".tmp")]


def test_mutating_after_save_returns_does_not_change_what_was_saved(tmp_path: Path) -> None:
    model = torch.nn.Linear(1024, 1024)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, _opts()) as mgr:
        mgr.save(1, {"model": model})
        assert mgr.is_saving_in_progress() or mgr.latest_step() == 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(7.0)
        mgr.wait_until_finished()
        restored = mgr.restore()
    assert restored is not None
    for key, value in expected.items():
        assert torch.equal(restored["model"][key], value), key


def test_writer_failure_surfaces_once_and_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = tensors.write_file
    with CheckpointManager(tmp_path, _opts(max_to_keep=1)) as mgr:
        mgr.save(1, {"x": torch.ones(3)})
        mgr.wait_until_finished()

        def failing_write(f: Any, blobs: Any, filename: str) -> Any:
            real_write(f, blobs, filename)  # bytes on disk, then the failure
            raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(tensors, "write_file", failing_write)
        mgr.save(2, {"x": torch.ones(3)})
        with pytest.raises(DiskFullError, match="step 2") as info:
            mgr.wait_until_finished()
        assert "injected" in str(info.value.__cause__)
        mgr.check_for_errors()  # raised once only
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1], "the failed step is not listed; retention did not run"
        assert _tmp_entries(tmp_path) == []
        mgr.reload()
        assert mgr.all_steps() == [1]

        monkeypatch.setattr(tensors, "write_file", real_write)
        assert mgr.save(3, {"x": torch.ones(3)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3]


def test_failure_is_raised_by_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write(*_: Any) -> Any:
        raise OSError(5, "I/O error (injected)")

    with CheckpointManager(tmp_path, _opts()) as mgr:
        monkeypatch.setattr(tensors, "write_file", failing_write)
        mgr.save(1, {"x": torch.ones(3)})
        while mgr.is_saving_in_progress():
            pass
        with pytest.raises(OSError, match="injected"):
            mgr.save(2, {"x": torch.ones(3)})
        assert mgr.all_steps() == []


def test_stuck_save_times_out_and_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_write = tensors.write_file

    def stuck_write(*args: Any) -> Any:
        release.wait(10)
        return real_write(*args)

    monkeypatch.setattr(tensors, "write_file", stuck_write)
    with CheckpointManager(tmp_path, _opts(async_timeout_secs=0.2)) as mgr:
        mgr.save(1, {"x": torch.ones(3)})
        with pytest.raises(CheckpointError, match="did not finish in time"):
            mgr.wait_until_finished()
        release.set()
        monkeypatch.setattr(tensors, "write_file", real_write)
        mgr.save(2, {"x": torch.ones(3)})
        mgr.wait_until_finished()
        mgr.reload()
        assert mgr.all_steps() == [2]


@pytest.mark.parametrize("width", [32, 301], ids=["small", "padded"])
def test_async_and_sync_files_are_byte_identical(tmp_path: Path, width: int) -> None:
    """Also for files of 1 MiB and more with odd-sized tensors, whose tensors are
    aligned by padding entries that the snapshot's layout must reproduce."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16 * width, width), torch.nn.Linear(width, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16 * width)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "extra": {"epoch": 1}}
    for mode in (True, False):
        with CheckpointManager(
            tmp_path / str(mode), CheckpointManagerOptions(enable_async_checkpointing=mode)
        ) as mgr:
            mgr.save(5, state)
    a, b = tmp_path / "True" / "step_00000005", tmp_path / "False" / "step_00000005"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    with open(a / "optimizer.safetensors", "rb") as f:
        _, entries = verify.read_header(f, "optimizer.safetensors", f.seek(0, 2))
    assert any(k.startswith("__pad") for k in entries) == (width == 301)
    records = [json.loads((d / "checkpoint.json").read_bytes()) for d in (a, b)]
    for r in records:
        del r["created_at"], r["committed_at"], r["checksum"]
    assert records[0] == records[1]


def test_saving_every_step_does_not_grow_memory(tmp_path: Path) -> None:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of parameters
    process = psutil.Process()
    with CheckpointManager(tmp_path, _opts(max_to_keep=2)) as mgr:
        for step in range(200):
            with torch.no_grad():
                model.weight.add_(1)
            mgr.save(step, {"model": model, "extra": {"step": step}})
            if step == 20:
                mgr.wait_until_finished()
                warm = process.memory_info().rss
        mgr.wait_until_finished()
        grown = process.memory_info().rss - warm
        stats = mgr.last_save_stats()
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 180 saves"
    assert stats is not None and stats.step == 199 and stats.nbytes > 4 * 2**20
    assert stats.blocking_secs > 0 and stats.background_secs > 0


def test_exit_with_a_save_in_flight_finishes_it(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import torch
        from checkpointing import CheckpointManager, CheckpointManagerOptions
        mgr = CheckpointManager({str(tmp_path)!r}, CheckpointManagerOptions())
        mgr.save(9, {{"x": torch.ones(4_000_000)}})
        # no close(): the atexit hook must finish the save
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [9]
        restored = mgr.restore()
    assert restored is not None and torch.equal(restored["x"], torch.ones(4_000_000))
