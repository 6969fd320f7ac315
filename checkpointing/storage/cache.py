"""A local cache of remote steps' files: keyed by content, bounded, shared by processes.

Restoring from an object store reads from a local copy (ranged reads of every tensor
over the network would be slow, and direct I/O needs a local file). The copy lives in
an *entry* named after what the files must be: a hash of the record's file list (names,
sizes, checksums). A run deleted and re-created at the same URL therefore never meets
its predecessor's files, and two URLs holding the same step share one entry.

An entry holds only the files that restores needed (a partial restore downloads its
items' files only). Each file is downloaded to a temporary name, checked against the
record (size and checksums) as it arrives, and renamed into place: a present file is a
complete one, and a killed download leaves a temporary file that the next downloader
removes.

Processes share the cache through `flock` on each entry's lock file: readers hold it
shared for as long as they read, a downloader exclusively. Past ``max_bytes``, the
least recently used entries are evicted, but only those nobody holds (exclusive,
non-blocking), so a step being read is never evicted, and the bound may be exceeded
for as long as held entries alone exceed it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

from checkpointing.errors import raise_if_disk_full
from checkpointing.fastio.threads import parallel_map
from checkpointing.format import verify
from checkpointing.format.record import Record
from checkpointing.storage.remote import FsspecStorage

DEFAULT_MAX_BYTES = 16 << 30
_LOCK = ".lock"
_ENTRY = re.compile(r"[0-9a-f]{32}")
_TMP = ".tmp-"
_EVICTED = ".evicted-"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/checkpointing/steps`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "checkpointing" / "steps"


def entry_key(record: Record) -> str:
    """What an entry is named after: its files' names, sizes and checksums."""
    files = {name: [i.size, i.header_checksum, i.checksum] for name, i in record.files.items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


class StepCache:
    """Remote steps' files on local disk (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    @contextlib.contextmanager
    def holding(
        self, remote: FsspecStorage, folder: str, record: Record, files: Collection[str]
    ) -> Iterator[tuple[Path, set[str]]]:
        """Hold the entry of ``record`` with ``files`` in it (downloaded from ``folder``
        of ``remote`` as needed) for the block: its folder, and the files this call
        downloaded (and so just verified). Nobody evicts the entry meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.root / entry_key(record)
        downloaded: set[str] = set()
        while True:
            fd = _lock_file(entry)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if _is_current(entry, fd) and all((entry / f).is_file() for f in files):
                    now = time.time_ns()  # finer than the kernel's own file times
                    os.utime(fd, ns=(now, now))  # the least recently used go first
                    break
                fcntl.flock(fd, fcntl.LOCK_EX)  # not atomic: the loop checks again
                if _is_current(entry, fd):
                    missing = [f for f in files if not (entry / f).is_file()]
                    self._make_room(sum(record.files[f].size for f in missing), keep=entry)
                    _download(remote, folder, record, entry, missing)
                    downloaded.update(missing)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # and around again, to hold it shared
        try:
            yield entry, downloaded
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                self._make_room(0, keep=None)

    # ---------------------------------------------------------------- eviction

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every entry, least recently used first; leftovers
        of killed evictions are removed on the way."""
        found = []
        for child in self.root.iterdir():
            if child.name.startswith(_EVICTED):
                shutil.rmtree(child, ignore_errors=True)
            elif _ENTRY.fullmatch(child.name) and not child.is_symlink() and child.is_dir():
                try:
                    used = (child / _LOCK).stat().st_mtime
                except FileNotFoundError:
                    used = 0.0
                size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
                found.append((used, size, child))
        return sorted(found)

    def _make_room(self, needed: int, *, keep: Path | None) -> None:
        """Evict what nobody holds (but ``keep``) until ``needed`` more bytes fit."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries) + needed
        for _, size, entry in entries:
            if total <= self.max_bytes:
                return
            if entry != keep and _evict_unless_held(entry):
                total -= size


def _lock_file(entry: Path) -> int:
    entry.mkdir(exist_ok=True)
    return os.open(entry / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


def _is_current(entry: Path, fd: int) -> bool:
    """Whether ``fd`` is still the lock file of ``entry`` (not of an evicted one)."""
    try:
        return os.stat(entry / _LOCK, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _evict_unless_held(entry: Path) -> bool:
    """Remove ``entry`` if nobody holds it; whether it was removed."""
    try:
        fd = os.open(entry / _LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None
    except OSError:
        return False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
        gone = entry.with_name(f"{_EVICTED}{uuid.uuid4().hex}")
        entry.rename(gone)  # out of sight at once; removed at leisure
        shutil.rmtree(gone, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _download(
    remote: FsspecStorage, folder: str, record: Record, entry: Path, files: list[str]
) -> None:
    """Download ``files`` into ``entry`` (held exclusively), each checked as it comes."""
    for leftover in entry.rglob(f"{_TMP}*"):  # of a killed download: we hold the entry
        leftover.unlink(missing_ok=True)

    def fetch(filename: str) -> None:
        info = record.files[filename]
        final = entry / filename
        final.parent.mkdir(exist_ok=True)
        part = final.with_name(f"{_TMP}{uuid.uuid4().hex[:8]}-{final.name}")
        where = f"{remote.url}/{folder}/{filename}"
        expected = (info.size, info.header_checksum, info.checksum)

        def attempt() -> None:  # from the start each time: the checks need every byte
            with open(part, "wb") as out, remote.open_read(f"{folder}/{filename}") as f:
                verify.copy_checked(f, out, expected, where)
                out.flush()
                os.fsync(out.fileno())

        try:
            remote.retry(attempt)
            os.replace(part, final)
        except BaseException as e:
            part.unlink(missing_ok=True)
            raise_if_disk_full(e, f"downloading {where} into the cache {entry}")
            raise

    parallel_map(fetch, files, remote.parallelism)
