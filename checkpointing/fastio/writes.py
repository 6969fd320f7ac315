"""Local files written durably at the disk's speed.

A plain ``write`` only fills the page cache, and ``fsync`` then writes everything at the
end, serially. Writes here go around the page cache (O_DIRECT), from the caller's memory
where it is page-aligned where the file is and through aligned bounce buffers elsewhere,
a helper thread writing while the caller goes on. Where O_DIRECT is refused (tmpfs,
some FUSE) writes go through the page cache with write-behind. docs/decisions.md has
the measurements behind each choice.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from checkpointing.fastio import direct
from checkpointing.fastio.direct import ALIGN


class DurableFile(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> DurableFile: ...
    def __exit__(self, *exc: object) -> None: ...


def create_durable(path: Path) -> DurableFile:
    """A new file (it must not exist) whose bytes are on disk once it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    if direct.O_DIRECT is not None:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct.O_DIRECT)
        except OSError:  # the filesystem has no direct I/O (tmpfs, some FUSE)
            pass
        else:
            return DirectFile(fd)
    return WriteBehindFile(fd)


# Bytes to write, and the bounce buffer they are in, if any
_Job = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]

# Bounce buffers of closed files, for the next file: new ones cost page faults. At most
# one file's worth (16 MiB) stays allocated between saves.
_spare: list[np.ndarray[Any, Any]] = []
_spare_lock = threading.Lock()


class DirectFile:
    """Writes with O_DIRECT on a helper thread, from the caller's memory where it can.

    Runs of the caller's bytes that are page-aligned where the file is (large tensors,
    placed so by `format.tensors.data_offsets`; an async save's snapshot) are written
    from that memory as they are; the rest is copied into page-aligned bounce buffers
    (numpy's copy releases the GIL) while the helper writes the previous ones. Either
    way the caller's bytes must stay unchanged until `close`, which pads the last page,
    truncates the file to its true size and fsyncs it. Bounce buffers are taken as
    needed (a small file needs one) and kept for the next file.
    """

    BUFFER = 4 << 20  # bytes of a bounce buffer
    BUFFERS = 4  # bounce buffers at most
    _GATHER = 64 << 20  # bytes after which a call takes no more jobs (nor after 64 jobs)

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._size = 0  # bytes accepted from the caller
        self._current: np.ndarray[Any, Any] | None = None  # the bounce buffer being filled
        self._filled = 0  # its bytes filled
        self._sent = 0  # and queued
        self._allocated = 0
        self._free: queue.Queue[np.ndarray[Any, Any]] = queue.Queue()
        self._full: queue.Queue[_Job | None] = queue.Queue()  # None: no more
        self._error: OSError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="checkpointing-write", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview) -> int:
        self._raise_error()
        src = np.frombuffer(data, dtype=np.uint8)
        address = src.ctypes.data
        pos = 0
        while pos < len(src):
            left = len(src) - pos
            to_page = -self._size % ALIGN  # bytes until the file is at a page boundary
            in_step = (address + pos + to_page) % ALIGN == 0  # and the memory, then?
            if in_step and not to_page and left >= ALIGN:
                n = left - left % ALIGN
                self._submit_current(last=False)
                self._full.put((src[pos : pos + n], None))
            else:
                if self._current is None:
                    self._current, self._filled, self._sent = self._take_buffer(), 0, 0
                n = min(left, self.BUFFER - self._filled, to_page if in_step and to_page else left)
                self._current[self._filled : self._filled + n] = src[pos : pos + n]
                self._filled += n
                if self._filled == self.BUFFER:
                    self._submit_current(last=True)
            pos += n
            self._size += n
        return len(src)

    def _submit_current(self, *, last: bool) -> None:
        """Queue the bounce buffer's bytes not queued yet. Before a run of the caller's
        own memory (``last=False``) the buffer stays current and fills on after them
        (the run starts on a page of the file, so they end on a page of the buffer).
        Queued whole, four buffers would hold the caller to four large tensors ahead of
        the disk, and the writes to a few MiB each. With ``last`` the buffer goes back to
        the free ones once written."""
        if self._current is None:
            return
        part = self._current[self._sent : self._filled]
        if last:
            self._full.put((part, self._current))
            self._current = None
        elif len(part):
            self._full.put((part, None))
            self._sent = self._filled

    def _take_buffer(self) -> np.ndarray[Any, Any]:
        if self._free.empty() and self._allocated < self.BUFFERS:
            self._allocated += 1
            with _spare_lock:
                if _spare:
                    return _spare.pop()
            return np.frombuffer(mmap.mmap(-1, self.BUFFER), dtype=np.uint8)
        return self._free.get()

    def _drain(self) -> None:
        more = True
        while more:
            jobs, more = self._gather()
            if jobs and self._error is None:
                try:
                    self._write_all([memoryview(data) for data, _ in jobs])  # type: ignore[arg-type]
                except OSError as e:  # raised to the caller on its next call
                    self._error = e
            for _, bounce in jobs:
                if bounce is not None:
                    self._free.put(bounce)

    def _gather(self) -> tuple[list[_Job], bool]:
        """What is queued, after waiting for the first, to write in one call (a tensor's
        aligned bytes and the bounce buffer with its ends become one request, not
        three); and whether more will come."""
        jobs: list[_Job] = []
        size = 0
        job = self._full.get()
        while job is not None:
            jobs.append(job)
            size += len(job[0])
            if len(jobs) == 64 or size >= self._GATHER:
                return jobs, True
            try:
                job = self._full.get_nowait()
            except queue.Empty:
                return jobs, True
        return jobs, False

    def _write_all(self, views: list[memoryview]) -> None:
        """A short write (a nearly full disk) is continued until it completes or raises
        ENOSPC, so a file is never silently cut off."""
        while views:
            try:
                n = os.writev(self._fd, views)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Direct I/O refused mid-file (a short write left the offset unaligned,
                # or a device with larger blocks): go on through the page cache.
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                if not flags & (direct.O_DIRECT or 0):
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~(direct.O_DIRECT or 0))
                continue
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._current is not None:
                end = -(-self._filled // ALIGN) * ALIGN
                self._current[self._filled : end] = 0
                self._filled = end
                self._submit_current(last=True)
            self._full.put(None)
            self._thread.join()
            self._raise_error()
            os.ftruncate(self._fd, self._size)  # drop the padding of the last page
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            with _spare_lock:
                while not self._free.empty() and len(_spare) < self.BUFFERS:
                    _spare.append(self._free.get())

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_sync_file_range = _load_sync_file_range()
_START_WRITEBACK = 2  # SYNC_FILE_RANGE_WRITE
_WAIT_WRITEBACK = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_WRITE_BEHIND = 32 << 20  # bytes in flight before waiting for the oldest


class WriteBehindFile:
    """Buffered writes, with writeback started as data arrives (``sync_file_range``)
    and written pages dropped: the copy overlaps the disk, with no extra memory."""

    def __init__(self, fd: int) -> None:
        self._f = io.FileIO(fd, "wb")
        self._fd = fd
        self._pos = 0  # bytes written
        self._done = 0  # bytes known to be on disk and dropped from the page cache

    def write(self, data: bytes | memoryview) -> int:
        """Write all of ``data``: a short write (a nearly full disk) is continued until
        it completes or raises ENOSPC, so a file is never silently cut off."""
        view = memoryview(data).cast("B")
        while view:
            n = self._f.write(view) or 0
            view = view[n:]
            self._write_behind(n)
        return len(data)

    def _write_behind(self, n: int) -> None:
        if _sync_file_range is None:
            return
        _sync_file_range(self._fd, self._pos, n, _START_WRITEBACK)
        self._pos += n
        if self._pos - self._done > _WRITE_BEHIND:
            end = self._pos - _WRITE_BEHIND // 2
            _sync_file_range(self._fd, self._done, end - self._done, _WAIT_WRITEBACK)
            os.posix_fadvise(self._fd, self._done, end - self._done, os.POSIX_FADV_DONTNEED)
            self._done = end

    def close(self) -> None:
        if not self._f.closed:
            try:
                os.fsync(self._fd)
            finally:
                self._f.close()

    def __enter__(self) -> WriteBehindFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
