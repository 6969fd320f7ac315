"""A real ENOSPC, from a small filesystem: a failed save leaves the earlier steps alone."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, DiskFullError
from checkpointing.fastio import direct

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)
READ_ONLY = CheckpointManagerOptions(enable_async_checkpointing=False, read_only=True)
MIB = 1 << 20
PAGE = 4096


def mount_small(tmp_path: Path, fs: str, tmpfs_options: str = "size=8m") -> Iterator[Path]:
    """An 8 MiB filesystem, unmounted afterwards: a tmpfs (no direct I/O: writes go
    through the page cache) or an ext4 image on a loop device (writes use O_DIRECT)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if fs == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", tmpfs_options, "tmpfs", str(mount_point)]
    else:
        image = tmp_path / "ext4.img"
        image.write_bytes(b"")
        os.truncate(image, 9 * MIB)  # 8.1 MiB free without a journal and reserved blocks
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)],
            capture_output=True,
        )
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 image: {made.stderr!r}")
        command = ["mount", "-o", "loop", str(image), str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {fs}: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mount_small(tmp_path, "tmpfs")


@pytest.fixture(params=["tmpfs", "ext4", "page cache"])
def small_disk_any(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Each way of writing files: O_DIRECT (tmpfs has it since Linux 6.6, ext4), and
    buffered with write-behind where a filesystem refuses direct I/O."""
    if request.param == "page cache":
        monkeypatch.setattr(direct, "O_DIRECT", None)
    yield from mount_small(tmp_path, "ext4" if request.param == "ext4" else "tmpfs")


def state(step: int, mib: float) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(int(mib * MIB) // 4, dtype=torch.float32) + step}


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_until(directory: Path, free: int) -> Path:
    """Write a filler file leaving ``free`` bytes (a multiple of the page size)."""
    filler = directory.parent / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * (free_bytes(directory) - free))
    assert free_bytes(directory) == free, "tmpfs did not account the filler page by page"
    return filler


def assert_enospc(exc: BaseException) -> None:
    """ENOSPC on ``exc`` or on an exception it wraps."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    assert any(getattr(e, "errno", None) == errno.ENOSPC for e in chain), (
        f"expected ENOSPC, got {[f'{type(e).__name__}: {e}' for e in chain]}"
    )


def assert_intact(directory: Path, steps: dict[int, float]) -> None:
    """Exactly ``steps`` (step -> size in MiB) are listed, restorable, with no leftovers."""
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [], f"a failed save left {leftovers}"
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        f"step_{s:08d}" for s in sorted(steps)
    ], "a step directory that is not a listed checkpoint"
    with CheckpointManager(directory, READ_ONLY) as reader:
        assert reader.all_steps() == sorted(steps)
        for step, mib in steps.items():
            restored = reader.restore(step=step)
            assert restored is not None and torch.equal(restored["w"], state(step, mib)["w"]), (
                f"step {step} changed"
            )


def test_save_too_big_for_the_disk_fails_cleanly(small_disk_any: Path) -> None:
    directory = small_disk_any / "ckpt"
    with CheckpointManager(directory, SYNC) as mgr:
        for step in range(1, 5):
            mgr.save(step, state(step, 1))
        with pytest.raises(DiskFullError, match="no space left") as info:
            mgr.save(5, state(5, 5))
        assert_enospc(info.value)
        assert mgr.latest_step() == 4
        assert mgr.all_steps() == [1, 2, 3, 4]
        assert_intact(directory, {s: 1 for s in range(1, 5)})

        mgr.delete(1)
        mgr.delete(2)
        assert mgr.save(5, state(5, 5))
        assert mgr.latest_step() == 5
    assert_intact(directory, {3: 1, 4: 1, 5: 5})


def test_no_room_for_the_commit_record(small_disk: Path) -> None:
    """The data files fit, the commit record does not: the step must not appear."""
    directory = small_disk / "ckpt"
    with CheckpointManager(directory, SYNC) as mgr:
        mgr.save(1, state(1, 1))
        data_size = (directory / "step_00000001" / "tensors.safetensors").stat().st_size
        filler = fill_until(directory, -(-data_size // PAGE) * PAGE)
        with pytest.raises(DiskFullError, match="no space left") as info:
            mgr.save(2, state(2, 1))
        assert_enospc(info.value)
        assert mgr.all_steps() == [1]
        assert_intact(directory, {1: 1})

        filler.unlink()
        assert mgr.save(2, state(2, 1))
    assert_intact(directory, {1: 1, 2: 1})


def many_tensors(step: int) -> dict[str, dict[str, torch.Tensor]]:
    """Small data, but a commit record of several pages (one entry per tensor)."""
    return {"w": {f"t{i}": torch.full((256,), float(step)) for i in range(200)}}


def test_commit_record_partly_written_is_not_committed(small_disk: Path) -> None:
    directory = small_disk / "ckpt"
    with CheckpointManager(directory, SYNC) as mgr:
        mgr.save(1, many_tensors(1))
        step_dir = directory / "step_00000001"
        assert (step_dir / "checkpoint.json").stat().st_size > 2 * PAGE
        data_size = (step_dir / "w.safetensors").stat().st_size
        fill_until(directory, -(-data_size // PAGE) * PAGE + PAGE)  # the record's 1st page
        with pytest.raises(DiskFullError, match="no space left") as info:
            mgr.save(2, many_tensors(2))
        assert_enospc(info.value)
        assert mgr.all_steps() == [1]


def test_bookkeeping_on_a_full_disk_is_disk_full(small_disk: Path) -> None:
    """protect() and record_metrics() write small files; out of space they raise
    DiskFullError, and the step they concern is untouched."""
    directory = small_disk / "ckpt"
    with CheckpointManager(directory, SYNC) as mgr:
        mgr.save(1, state(1, 1))
        filler = fill_until(directory, 0)
        with pytest.raises(DiskFullError, match=r"protected\.json") as info:
            mgr.protect(1)
        assert_enospc(info.value)
        with pytest.raises(DiskFullError, match=r"recorded_metrics\.json"):
            mgr.record_metrics(1, {"loss": 0.5})
        assert_intact(directory, {1: 1})
        filler.unlink()
        mgr.protect(1)
        mgr.record_metrics(1, {"loss": 0.5})
        assert mgr.metrics(1) == {"loss": 0.5}


def test_out_of_inodes_is_disk_full(tmp_path: Path) -> None:
    """A file system with room but no inodes left: the save is rolled back."""
    for mount_point in mount_small(tmp_path, "tmpfs", "size=64m,nr_inodes=24"):
        directory = mount_point / "ckpt"
        with CheckpointManager(directory, SYNC) as mgr:
            saved = []
            with pytest.raises(DiskFullError, match="no space left"):
                for step in range(1, 24):
                    mgr.save(step, {"a": torch.ones(2), "b": {"x": torch.ones(2)}})
                    saved.append(step)
            assert saved and mgr.all_steps() == saved
            with contextlib.suppress(OSError):  # the last inodes, taken by other files
                for i in range(100):
                    (mount_point / f"other{i}").touch()
            with pytest.raises(DiskFullError, match=r"protected\.json"):
                mgr.protect(saved[0])
        with CheckpointManager(directory, READ_ONLY) as reader:
            for step in saved:
                assert reader.restore(step=step)["a"].tolist() == [1.0, 1.0]
