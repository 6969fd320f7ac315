"""The remote tier of a mirrored manager, with a local folder as the remote: what it
lists, uploads, deletes and agrees on across processes. (Object stores: tests/remote.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, KeepLatest
from checkpointing.coordination import SingleProcess
from checkpointing.errors import CheckpointNotFoundError
from checkpointing.format.naming import PrefixNaming
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.remote_tier import Mirror, NoRemote
from checkpointing.storage import LocalStorage

T = TypeVar("T")
SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


def _local(path: Path, *steps: int) -> tuple[LocalStorage, dict[int, Record]]:
    """A local directory with ``steps`` saved, and their commit records."""
    with CheckpointManager(path, SYNC) as mgr:
        for step in steps:
            mgr.save(step, {"x": torch.full((2,), float(step))})
    records = {
        s: Record.from_json((path / _folder(s) / RECORD_NAME).read_bytes(), "test")
        for s in steps
    }
    return LocalStorage(path, create=False), records


def _folder(step: int) -> str:
    return f"step_{step:08d}"


def _mirror(url: str, retention: Any = None, *, distributed: bool = False) -> Mirror:
    return Mirror(
        url,
        storage_options=None,
        retention=retention,
        naming=PrefixNaming(),
        distributed=distributed,
    )


class Primary(SingleProcess):
    """The primary of a job of two: its broadcasts are what everyone gets."""

    world_size = 2


def test_no_remote_lists_nothing_and_has_no_steps(tmp_path: Path) -> None:
    none = NoRemote()
    assert none.reload() == {} and none.listed() == {} and not none.busy
    with pytest.raises(CheckpointNotFoundError):
        none.fetch(1, None, tmp_path)  # type: ignore[arg-type]


def test_uploads_what_the_remote_lacks_and_applies_its_own_retention(tmp_path: Path) -> None:
    storage, records = _local(tmp_path / "local", 1, 2, 3)
    mirror = _mirror(f"file://{tmp_path / 'remote'}", KeepLatest(2))
    mirror.after_commit(storage, records, _folder, 0.0, SingleProcess(), held=False)
    mirror.wait()
    assert list(mirror.known()) == [2, 3] == list(mirror.listed())
    listed = sorted(p.name for p in (tmp_path / "remote").iterdir() if p.name[0] != ".")
    assert listed == ["step_00000002", "step_00000003"], "step 1 was deleted there"
    again = _mirror(f"file://{tmp_path / 'remote'}")
    assert list(again.reload()) == [2, 3], "a new process lists what was uploaded"


def test_in_a_job_the_listing_changes_at_the_join(tmp_path: Path) -> None:
    storage, records = _local(tmp_path / "local", 1)
    mirror = _mirror(f"file://{tmp_path / 'remote'}", distributed=True)
    mirror.after_commit(storage, records, _folder, 0.0, Primary(), held=False)
    mirror.wait()
    assert list(mirror.known()) == [1] and list(mirror.listed()) == []  # agreed before upload
    mirror.after_commit(storage, records, _folder, 0.0, Primary(), held=True)
    assert list(mirror.listed()) == [], "held until the save is joined"
    mirror.release_held()
    assert list(mirror.listed()) == [1]
    mirror.delete(1, primary=True)
    assert mirror.listed() == {} and not (tmp_path / "remote" / "step_00000001").exists()
