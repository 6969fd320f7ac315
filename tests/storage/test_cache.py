"""The cache of remote steps' files: keyed by content, bounded, never evicting an entry
someone reads (in this process or another, until that one dies), cleaning leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, CorruptCheckpointError
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.storage import FsspecStorage, LocalStorage, open_storage
from checkpointing.storage.cache import StepCache, entry_key
from checkpointing.storage.transfer import copy_step

SIZE = 1 << 16  # floats per item: 256 KiB a file, two files a step


def remote_steps(tmp_path: Path, steps: range, fill: float = 0.0) -> tuple[FsspecStorage, dict]:
    """Steps with items ``a`` and ``b`` saved locally, then copied to an in-memory store."""
    local = tmp_path / f"local-{uuid.uuid4().hex[:6]}"
    opts = CheckpointManagerOptions(enable_async_checkpointing=False)
    with CheckpointManager(local, opts) as mgr:
        for step in steps:
            value = float(step) + fill
            a, b = torch.full((SIZE,), value), torch.full((SIZE,), -value)
            mgr.save(step, {"a": {"t": a}, "b": {"t": b}})  # a.safetensors, b.safetensors
    remote = open_storage(f"memory://cache-{uuid.uuid4().hex}/run", create=True, storage_options={})
    assert isinstance(remote, FsspecStorage)
    source = LocalStorage(str(local), create=False)
    records = {}
    for folder in sorted(p.name for p in local.glob("step_*")):
        record = Record.from_json((local / folder / RECORD_NAME).read_bytes(), folder)
        copy_step(source, remote, (folder, folder), record)
        records[folder] = record
    return remote, records


def entries(cache: StepCache) -> set[str]:
    return {p.name for p in cache.root.iterdir() if not p.name.startswith(".")}


def test_only_the_files_asked_for_are_downloaded_once_and_checked(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 2))
    (folder, record), cache = next(iter(records.items())), StepCache(tmp_path / "cache")
    a = next(f for f in record.files if f.startswith("a"))
    with cache.holding(remote, folder, record, [a]) as (entry, downloaded):
        assert downloaded == {a}
        assert sorted(p.name for p in entry.iterdir() if p.name != ".lock") == [a]
    with cache.holding(remote, folder, record, [a]) as (entry, downloaded):
        assert downloaded == set()  # cached: neither downloaded nor checked again
    with cache.holding(remote, folder, record, list(record.files)) as (entry, downloaded):
        assert downloaded == set(record.files) - {a}
        assert (entry / a).read_bytes() == remote.read_bytes(f"{folder}/{a}", 1 << 30)


def test_a_damaged_remote_file_is_never_cached(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 2))
    (folder, record), cache = next(iter(records.items())), StepCache(tmp_path / "cache")
    name = next(iter(record.files))
    data = bytearray(remote.read_bytes(f"{folder}/{name}", 1 << 30))
    data[-1] ^= 0xFF
    remote.fs.pipe_file(f"{remote.root}/{folder}/{name}", bytes(data))
    with pytest.raises(CorruptCheckpointError), cache.holding(remote, folder, record, [name]):
        pass
    (entry,) = (cache.root / e for e in entries(cache))
    assert [p.name for p in entry.iterdir()] == [".lock"], "no file, no partial download"


def test_a_step_recreated_with_other_content_gets_its_own_entry(tmp_path: Path) -> None:
    remote, first = remote_steps(tmp_path, range(1, 2))
    again, second = remote_steps(tmp_path, range(1, 2), fill=0.5)
    (folder, old), (_, new) = next(iter(first.items())), next(iter(second.items()))
    assert entry_key(old) != entry_key(new)
    cache = StepCache(tmp_path / "cache")
    with cache.holding(remote, folder, old, list(old.files)):
        pass
    with cache.holding(again, folder, new, list(new.files)) as (entry, downloaded):
        assert downloaded == set(new.files)
        assert entry.name == entry_key(new)


def test_least_recently_used_entries_go_past_the_bound(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 6))
    step_bytes = sum(i.size for i in next(iter(records.values())).files.values())
    cache = StepCache(tmp_path / "cache", max_bytes=int(2.5 * step_bytes))
    folders = list(records)
    for folder in folders[:3]:
        with cache.holding(remote, folder, records[folder], list(records[folder].files)):
            pass
    assert entries(cache) == {entry_key(records[f]) for f in folders[1:3]}
    with cache.holding(remote, folders[1], records[folders[1]], []):  # used: now the newest
        pass
    with cache.holding(remote, folders[3], records[folders[3]], list(records[folders[3]].files)):
        pass
    assert entries(cache) == {entry_key(records[f]) for f in (folders[1], folders[3])}


def test_an_entry_being_read_is_never_evicted(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 5))
    cache = StepCache(tmp_path / "cache", max_bytes=1)  # room for nothing
    (first, *rest) = records
    with cache.holding(remote, first, records[first], list(records[first].files)) as (entry, _):
        for folder in rest:
            with cache.holding(remote, folder, records[folder], list(records[folder].files)):
                assert entry.is_dir()
        assert entries(cache) == {entry.name}, "held: over the bound, everything else went"
        assert all(Path(entry, f).is_file() for f in records[first].files)
    with cache.holding(remote, rest[0], records[rest[0]], []):
        pass
    assert entries(cache) == {entry_key(records[rest[0]])}


HOLDER = """
import sys, time
from pathlib import Path
from checkpointing.format.record import Record
from checkpointing.storage.cache import StepCache
root, record_path, folder = sys.argv[1:]
record = Record.from_json(Path(record_path).read_bytes(), record_path)
# Every file is cached already: holding reads no store.
with StepCache(Path(root)).holding(None, folder, record, list(record.files)):
    print("held", flush=True)
    time.sleep(600)
"""


def test_an_entry_another_process_reads_stays_until_that_process_dies(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 4))
    (first, second, third) = records
    with StepCache(tmp_path / "cache").holding(
        remote, first, records[first], list(records[first].files)
    ):
        pass
    cache = StepCache(tmp_path / "cache", max_bytes=1)
    record_path = tmp_path / "record.json"
    record_path.write_bytes(records[first].to_json())
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache.root), str(record_path), first],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "held\n"
        with cache.holding(remote, second, records[second], list(records[second].files)):
            pass
        assert entry_key(records[first]) in entries(cache)
    finally:
        reader.kill()
        reader.wait()
    with cache.holding(remote, third, records[third], list(records[third].files)):
        assert entries(cache) == {entry_key(records[third])}, "a dead reader holds nothing"


def test_leftovers_of_killed_downloads_and_evictions_are_removed(tmp_path: Path) -> None:
    remote, records = remote_steps(tmp_path, range(1, 2))
    (folder, record), cache = next(iter(records.items())), StepCache(tmp_path / "cache")
    entry = cache.root / entry_key(record)
    entry.mkdir(parents=True)
    (entry / ".tmp-1234abcd-a.safetensors").write_bytes(b"half a download")
    evicted = cache.root / ".evicted-0123"
    (evicted / "sub").mkdir(parents=True)
    (evicted / "sub" / "x").write_bytes(b"x" * 100)
    with cache.holding(remote, folder, record, list(record.files)) as (held, downloaded):
        assert downloaded == set(record.files)
        assert not any(p.name.startswith(".tmp-") for p in held.rglob("*"))
    assert not evicted.exists()
    assert os.listdir(cache.root) == [entry.name]
