"""Local files read at the disk's speed, and opened safely.

Reads go around the page cache (O_DIRECT): `read_direct` into aligned memory as it
is, `read_bounced` through a page-aligned buffer for small reads, and `ParallelReads`
keeps several such requests in flight on helper threads (a restore's tensors). Where
O_DIRECT is refused, `DropBehindFile` reads through the page cache with read-ahead.
`open_below` opens a checkpoint's files without following links (checkpoints are
untrusted). docs/decisions.md has the measurements behind each choice.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import io
import itertools
import mmap
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from checkpointing.errors import CorruptCheckpointError
from checkpointing.fastio import direct
from checkpointing.fastio.direct import ALIGN


def open_below(root: Path, relative: str) -> int:
    """A read descriptor of the regular file at ``relative`` (``/``-separated) below
    ``root``, reached without following any symbolic link below ``root``.

    Checkpoints are untrusted: a symlink inside a step would make a restore read (and a
    copy publish) a file outside the directory, and opening a FIFO would block forever.
    Each component is opened relative to its parent with O_NOFOLLOW, the file without
    blocking, and it must be a regular file. A missing file raises `FileNotFoundError`;
    anything else in the way raises `CorruptCheckpointError`.
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _not_regular(root, relative, "is not a plain relative path")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    at = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=at)
            os.close(at)
            at = inner
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=at)
    except OSError as e:
        if e.errno in _NOT_REGULAR:
            what = "is, or passes through, a symbolic link or a socket"
            raise _not_regular(root, relative, what) from None
        raise
    finally:
        os.close(at)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_regular(root, relative, "is not a regular file (a FIFO, device, folder)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# What opening gives for a link (ELOOP, EMLINK), a file where a folder belongs
# (ENOTDIR), a socket (ENXIO) or a device without a driver (ENODEV, EOPNOTSUPP).
_NOT_REGULAR = {
    errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP
}  # fmt: skip


def _not_regular(root: Path, relative: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{root}/{relative} {what}; refusing to read it (checkpoint files are regular files)"
    )


class DropBehindFile(io.FileIO):
    """A file read sequentially in large disk requests, dropping what it has read; and
    the descriptor for direct reads of the same file (`direct`).

    Restores read tensor by tensor, often a few MB at a time; on their own those reads
    become small disk requests that wait on latency. A helper thread asks for the next
    32 MiB ahead of the reader (WILLNEED, whose submission cost then overlaps the reads)
    and the reader drops the pages it consumed (DONTNEED), sparing the kernel the
    page-cache upkeep. Other readers of the same files read them from disk again. The
    read-ahead starts with the first read of data, and never once `direct` was asked for
    (it would read the same bytes twice).
    """

    _AHEAD = 32 << 20
    _STEP = 8 << 20

    def __init__(self, path: Path, root: Path | None = None) -> None:
        """Open ``path``; when ``root`` is given, as `open_below` does from there."""
        if root is None:
            super().__init__(path, "rb")
        else:
            super().__init__(open_below(root, path.relative_to(root).as_posix()), "rb")
            self.name = str(path)
        os.posix_fadvise(self.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._size = os.fstat(self.fileno()).st_size
        self._reader_at = 0
        self._moved = threading.Condition()
        self._prefetching = False
        self._direct: int | None = None  # an O_DIRECT descriptor of the file, once opened
        self._direct_tried = False

    def direct(self) -> int | None:
        """A descriptor of this file opened with O_DIRECT, for `read_direct`; None where
        the filesystem has no direct I/O. Turns the read-ahead off."""
        if not self._direct_tried and direct.O_DIRECT is not None:
            self._direct_tried = True
            with contextlib.suppress(OSError):  # the same file, not whatever has its name now
                self._direct = os.open(
                    f"/proc/self/fd/{self.fileno()}",
                    os.O_RDONLY | os.O_CLOEXEC | direct.O_DIRECT,
                )
        return self._direct

    def _prefetch(self) -> None:
        ahead = 0
        while ahead < self._size:
            with self._moved:
                while not self.closed and ahead >= self._reader_at + self._AHEAD:
                    self._moved.wait()
                if self.closed:
                    return
                fd = self.fileno()
            with contextlib.suppress(OSError):  # closed meanwhile
                os.posix_fadvise(fd, ahead, self._STEP, os.POSIX_FADV_WILLNEED)
            ahead += self._STEP

    def readinto(self, buffer: Any) -> int | None:
        start = self.tell()
        n = super().readinto(buffer)
        if n:
            os.posix_fadvise(self.fileno(), start, n, os.POSIX_FADV_DONTNEED)
        self.reading_at(start + (n or 0))
        return n

    def reading_at(self, offset: int) -> None:
        """Move the read-ahead window to ``offset``: for readers of a mapping of this
        file, which bypass `readinto` (their pages are kept: they hold the tensors)."""
        with self._moved:
            self._reader_at = offset
            if not self._prefetching and self._direct is None:
                self._prefetching = True
                threading.Thread(target=self._prefetch, daemon=True).start()
            self._moved.notify()

    def close(self) -> None:
        with self._moved:
            super().close()
            if self._direct is not None:
                os.close(self._direct)
                self._direct = None
            self._moved.notify()


_bounce = threading.local()  # each reading thread's page-aligned buffer for `read_bounced`
BOUNCE = 4 << 20  # the most bytes `read_bounced` reads at once


def read_direct(fd: int, offset: int, dest: memoryview) -> None:
    """Fill ``dest`` with the bytes at ``offset`` of ``fd``, a descriptor opened with
    O_DIRECT: no page cache, no copy. ``dest``'s address, ``offset`` and ``len(dest)``
    must be aligned as the file wants (`direct.alignment`). Raises EOFError when the
    file ends first."""
    _read_at_least(fd, dest, offset, len(dest))


def read_bounced(fd: int, offset: int, length: int) -> memoryview:
    """The ``length`` (at most `BOUNCE`) bytes at ``offset`` of ``fd`` (opened with
    O_DIRECT), read in one request into a buffer of the calling thread: valid until
    its next call. For memory that is not page-aligned where the file is. Raises
    EOFError when the file ends first."""
    buffer = getattr(_bounce, "buffer", None)
    if buffer is None:
        buffer = _bounce.buffer = memoryview(mmap.mmap(-1, BOUNCE + 2 * ALIGN))
    lead = offset % ALIGN
    pages = -(-(lead + length) // ALIGN) * ALIGN
    _read_at_least(fd, buffer[:pages], offset - lead, lead + length)
    return buffer[lead : lead + length]


def _read_at_least(fd: int, into: memoryview, offset: int, need: int) -> None:
    """Read into ``into`` from ``offset`` until its first ``need`` bytes are in."""
    done = 0
    while done < need:
        n = _pread(fd, into[done:], offset + done)
        if not n:
            raise EOFError(f"the file ends at {offset + done}, before {offset + need}")
        done += n


def _pread(fd: int, into: memoryview, offset: int) -> int:
    try:
        return os.preadv(fd, [into], offset)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    # Direct I/O refused (a device with larger blocks, some FUSE filesystems): go on
    # through the page cache, for every reader of this descriptor. Another helper may
    # have turned it off already, after this request was refused: try again all the same.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & (direct.O_DIRECT or 0):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~(direct.O_DIRECT or 0))
    return os.preadv(fd, [into], offset)


_PIECE = BOUNCE  # bytes per request of `ParallelReads`, at most
_SMALL = 64 << 10  # aligned bytes below which a destination goes through a bounce
_READERS = 4  # requests in flight
_RUN = 4 * _PIECE  # bytes of destinations that follow each other to read as one
_SEGMENT = 16 * _PIECE  # bytes of memory out of step moved into place at once


@dataclasses.dataclass
class _Run:
    """Destinations that follow each other in a file and in memory, from ``address``."""

    fd: int
    path: str
    offset: int
    end: int
    address: int
    parts: list[tuple[memoryview, Callable[[], None]]]  # (destination, its ``then``)


class ParallelReads:
    """Reads into memory on helper threads, with direct I/O, several requests in flight.

    Reading into the destination skips the page cache and the copy out of it, and
    several requests keep the disk busier than one at a time. Destinations that follow
    each other both in the file and in memory (the row runs of a shard) are read as one
    range, started once it holds `_RUN` bytes or at `flush`, so the disk gets large
    requests and the pages they share are read once. The aligned middle of a large
    destination is read into its own memory in requests of up to `_PIECE` bytes: as it
    is where the memory is in step with the file at the filesystem's direct-I/O
    alignment (`direct.alignment`: often finer than a page), else a few bytes early and
    then moved into place (a restarted job's tensors lie anywhere). The rest (small
    tensors, the ends of large ones) is read through a bounce buffer, one request for up
    to `_PIECE` bytes that follow each other in the file (across gaps of up to `_SMALL`
    bytes, read and dropped: a partial restore skips what others read).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: list[Future[None]] = []
        self._run: _Run | None = None  # destinations that may go on, not started yet
        # bytes to read through the bounce buffer, not started yet: (file offset,
        # destination, its tensor), in file order, all of one file
        self._bounced: list[tuple[int, memoryview, _Each]] = []
        self._bounced_file: tuple[int, str] = (-1, "")  # (descriptor, path)
        self._alignments: dict[int, tuple[int, int]] = {}  # descriptor: direct.alignment
        # the memory read into since the last settle: disjoint (start, end), sorted
        self._landing: list[tuple[int, int]] = []

    def start(
        self,
        fd: int,
        offset: int,
        dest: memoryview,
        address: int,
        then: Callable[[], None],
        path: str,
    ) -> None:
        """Fill ``dest`` (at ``address``) with the bytes at ``offset`` of ``fd`` (opened
        with O_DIRECT); ``then`` runs once they are all in, on a helper thread. The read
        may wait for the next destinations to join it: `flush` starts it. Memory that
        reads started before still land in (tied weights restored from untied ones) is
        read into once they are done: two reads at once would mix their bytes, and an
        out-of-step read, moved in place after landing early, is not even idempotent."""
        if dest:
            span = (address, address + len(dest))
            if self._lands_in(*span):
                self.settle()
            bisect.insort(self._landing, span)
        run = self._run
        if (
            run is not None
            and (run.fd, run.end, run.address + run.end - run.offset) == (fd, offset, address)
        ):
            run.parts.append((dest, then))
            run.end += len(dest)
        else:
            self._start_run()
            run = self._run = _Run(fd, path, offset, offset + len(dest), address, [(dest, then)])
        if run.end - run.offset >= _RUN:
            self._start_run()

    def _lands_in(self, start: int, end: int) -> bool:
        """Whether a read started since the last settle lands in ``start``..``end``."""
        i = bisect.bisect_left(self._landing, (start, start))
        before = i > 0 and self._landing[i - 1][1] > start
        return before or (i < len(self._landing) and self._landing[i][0] < end)

    def _start_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        offset, end, fd = run.offset, run.end, run.fd
        if len(run.parts) == 1:
            dest = run.parts[0][0]
        else:  # one view of the memory the parts tile
            dest = memoryview((ctypes.c_char * (end - offset)).from_address(run.address))
            dest = dest.cast("B")
        if fd not in self._alignments:
            self._alignments[fd] = direct.alignment(fd)
        memory, offsets = self._alignments[fd]
        step = max(memory, offsets)
        shift = (run.address - offset) % memory  # how far out of step the memory is
        first = offset + (-offset % step)  # the first and last aligned offsets in the range
        if first - offset < shift:  # shifted reads land before ``first``: inside the run
            first += step
        last = end - end % step
        if last - first < _SMALL:  # too little to read as it is
            self._start_straight_run(run, dest, [(offset, end)])
        elif not shift:
            self._start_straight_run(run, dest, [(offset, first), (last, end)], (first, last))
        else:
            self._start_shifted_run(run, dest, shift, step)

    def _start_straight_run(
        self,
        run: _Run,
        dest: memoryview,
        bounced: list[tuple[int, int]],
        as_is: tuple[int, int] | None = None,
    ) -> None:
        """Read ``run`` into ``dest``: the ``as_is`` range of the file (aligned, in step
        with the memory) straight into it, the ``bounced`` ranges through a bounce
        buffer."""
        offset, fd, path = run.offset, run.fd, run.path
        spans = [(a, b, False) for start, stop in bounced for a, b in _pieces(start, stop)]
        if as_is is not None:
            spans += [(a, b, True) for a, b in _pieces(*as_is)]
        spans = sorted(span for span in spans if span[0] < span[1])
        # Each part is done once the spans over it are; each span tells the parts it covers.
        covering: list[list[_Countdown]] = [[] for _ in spans]
        nothing: list[Callable[[], None]] = []
        starts, ends = [a for a, _, _ in spans], [b for _, b, _ in spans]
        at = offset
        for part, then in run.parts:
            over = range(bisect.bisect_right(ends, at), bisect.bisect_left(starts, at + len(part)))
            if not part or not over:  # nothing to read
                nothing.append(then)
            else:
                countdown = _Countdown(len(over), then)
                for i in over:
                    covering[i].append(countdown)
            at += len(part)
        for (a, b, straight), parts in zip(spans, covering, strict=True):
            view = dest[a - offset : b - offset]
            done = _Each(parts, run.parts)
            if straight:
                self._start_bounced()  # first, in file order
                self._submit(path, _read_into, fd, a, view, done)
            else:
                self._bounce(fd, path, a, view, done)
        if nothing:  # on a helper too: their errors come from `settle`, as the others'
            self._submit(path, _all, nothing)

    def _start_shifted_run(self, run: _Run, dest: memoryview, shift: int, step: int) -> None:
        """Read ``run`` into memory ``shift`` bytes out of step with the file, in segments
        of up to `_SEGMENT` bytes: the aligned middle of each straight into ``dest`` but
        ``shift`` bytes early, where the memory is aligned, then moved into place in one
        memmove once all of it is in. Through a bounce buffer instead, every byte would
        also be copied, and on some disks (virtio) direct reads into small reused buffers
        run far slower than into the destination (docs/decisions.md). A segment's head
        goes through a bounce buffer and is written after its move (the early middle
        overlaps it); the tail of the run through a bounce buffer into place. Segments
        stay inside their own bytes, so each moves as soon as it is in."""
        offset, end, fd, path, address = run.offset, run.end, run.fd, run.path, run.address
        last = end - end % step
        starts = [offset, *range(offset - offset % _SEGMENT + _SEGMENT, last, _SEGMENT)]
        ends = [*starts[1:], last]
        all_in = _Countdown(len(starts) + (end > last), lambda: _all([t for _, t in run.parts]))
        whole = _Each([all_in], run.parts)
        for start, stop in zip(starts, ends, strict=True):
            first = start + (-start % step)
            if first - start < shift:  # the early middle must land inside the segment
                first += step
            if first >= stop:  # too short to shift: all through the bounce buffer
                self._bounce(fd, path, start, dest[start - offset : stop - offset], whole)
                continue
            head = memoryview(bytearray(first - start))

            def moved(start: int = start, first: int = first, stop: int = stop,
                      head: memoryview = head) -> None:  # fmt: skip
                at = address + first - offset
                ctypes.memmove(at, at - shift, stop - first)
                dest[start - offset : first - offset] = head
                whole.done()

            pieces = _pieces(first, stop)
            segment = _Each([_Countdown(len(pieces) + 1, moved)], run.parts)  # + the head
            self._bounce(fd, path, start, head, segment)
            self._start_bounced()  # first, in file order
            for a, b in pieces:
                view = dest[a - offset - shift : b - offset - shift]
                self._submit(path, _read_into, fd, a, view, segment)
        if end > last:
            self._bounce(fd, path, last, dest[last - offset : end - offset], whole)

    def _bounce(self, fd: int, path: str, offset: int, dest: memoryview, tensor: _Each) -> None:
        last_end = self._bounced[-1][0] + len(self._bounced[-1][1]) if self._bounced else 0
        if self._bounced and (
            (fd, path) != self._bounced_file
            or not last_end <= offset <= last_end + _SMALL  # skipping little, if anything
            or offset + len(dest) - self._bounced[0][0] > _PIECE
        ):
            self._start_bounced()
        self._bounced.append((offset, dest, tensor))
        self._bounced_file = (fd, path)

    def _start_bounced(self) -> None:
        if self._bounced:
            fd, path = self._bounced_file
            self._submit(path, _read_through, fd, self._bounced)
            self._bounced = []

    def _submit(self, path: str, read: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                read(*args)
            except EOFError:
                raise CorruptCheckpointError(f"{path}: file is truncated") from None

        if self._pool is None:
            self._pool = ThreadPoolExecutor(_READERS, thread_name_prefix="checkpointing-read")
        self._in_flight.append(self._pool.submit(run))

    def flush(self) -> None:
        """Start the reads still waiting for others to join them (see `start`)."""
        self._start_run()
        self._start_bounced()

    def failed(self) -> bool:
        """Whether a read started so far has failed (its error comes from `settle`)."""
        return any(f.done() and f.exception() is not None for f in self._in_flight)

    def settle(self) -> None:
        self.flush()
        self._landing = []
        in_flight, self._in_flight = self._in_flight, []
        errors = [e for e in (f.exception() for f in in_flight) if e is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait for the reads in flight (their errors go nowhere), stop the helpers."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._in_flight.clear()
        self._bounced.clear()
        self._alignments.clear()
        self._landing = []
        self._run = None


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    """``start`` to ``end``, cut at the multiples of `_PIECE`."""
    cuts = [start, *range(start - start % _PIECE + _PIECE, end, _PIECE), end]
    return list(itertools.pairwise(cuts))


class _Each:
    """Tells each of ``countdowns`` that a span over their parts is done; keeps the
    parts' memory (``keep``) alive while a read into it is in flight (a run's view of
    it does not)."""

    def __init__(self, countdowns: list[_Countdown], keep: object) -> None:
        self._countdowns = countdowns
        self._keep = keep

    def done(self) -> None:
        _all([countdown.done for countdown in self._countdowns])


def _all(calls: list[Callable[[], None]]) -> None:
    """Make every call, even after one raised; then raise the first error."""
    errors = []
    for call in calls:
        try:
            call()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


class _Countdown:
    """Runs ``then`` when the last of ``parts`` parts is done, on the thread doing it."""

    def __init__(self, parts: int, then: Callable[[], None]) -> None:
        self._left = parts
        self._then = then
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = not self._left
        if last:
            self._then()


def _read_into(fd: int, offset: int, dest: memoryview, tensor: _Each) -> None:
    read_direct(fd, offset, dest)
    tensor.done()


def _read_through(fd: int, parts: list[tuple[int, memoryview, _Each]]) -> None:
    start = parts[0][0]
    data = read_bounced(fd, start, parts[-1][0] + len(parts[-1][1]) - start)
    source = np.frombuffer(data, dtype=np.uint8)

    def land(offset: int, dest: memoryview, tensor: _Each) -> Callable[[], None]:
        def call() -> None:
            at = offset - start
            np.copyto(np.frombuffer(dest, dtype=np.uint8), source[at : at + len(dest)])
            tensor.done()

        return call

    _all([land(*part) for part in parts])  # a ``then`` that raises skips no other
