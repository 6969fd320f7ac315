"""Durable local files: direct I/O through bounce buffers, and the page-cache fallback."""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from checkpointing.fastio import direct, reads, writes
from checkpointing.fastio.reads import DropBehindFile
from checkpointing.fastio.writes import create_durable

BUFFER = writes.DirectFile.BUFFER
SIZES = [0, 1, 4095, 4096, 4097, BUFFER - 1, BUFFER, 3 * BUFFER + 17]


@pytest.fixture(params=["direct", "page cache"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "page cache":
        monkeypatch.setattr(direct, "O_DIRECT", None)
    return str(request.param)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("piece", [1000, 1 << 20, 1 << 30])
def test_bytes_round_trip(tmp_path: Path, mode: str, size: int, piece: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    with create_durable(path) as f:
        if mode == "direct":
            assert isinstance(f, writes.DirectFile), "this filesystem has O_DIRECT"
        for start in range(0, size, piece):
            assert f.write(memoryview(data)[start : start + piece]) == min(piece, size - start)
    assert path.read_bytes() == data, "the page padding of direct I/O is cut off"
    with DropBehindFile(path) as f:
        assert f.read() == data


def test_bounce_buffers_are_reused_by_the_next_file_and_its_stale_bytes_never_written(
    tmp_path: Path,
) -> None:
    with create_durable(tmp_path / "a.bin") as f:
        f.write(b"\xab" * (3 * BUFFER))  # fills, and leaves behind, every bounce buffer
    spare = list(writes._spare)
    assert 0 < len(spare) <= writes.DirectFile.BUFFERS, "one file's worth is kept"
    with create_durable(tmp_path / "b.bin") as f:
        f.write(b"\x01" * 5000)  # ends mid-page: the rest of that page is padding
        reused = f._current  # type: ignore[attr-defined]
        assert any(reused is buffer for buffer in spare)
    assert (tmp_path / "b.bin").read_bytes() == b"\x01" * 5000


def test_existing_file_is_never_overwritten(tmp_path: Path, mode: str) -> None:
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        create_durable(tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == b"old"


def test_direct_io_refused_mid_file_goes_on_buffered(tmp_path: Path) -> None:
    """The kernel's EINVAL for an unaligned direct write switches the file to buffered."""
    f = create_durable(tmp_path / "f.bin")
    assert isinstance(f, writes.DirectFile)
    data = bytearray(os.urandom(3 * 4096 + 1))
    f._write_all([memoryview(data)[1:]])  # an unaligned address and length
    f._size = len(data) - 1  # what write() would have counted
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == data[1:]


def test_write_error_reaches_the_caller(tmp_path: Path) -> None:
    f = create_durable(tmp_path / "f.bin")
    assert isinstance(f, writes.DirectFile)
    os.close(f._fd)  # the helper thread's next write fails with EBADF
    f._fd = os.open(os.devnull, os.O_RDONLY)
    f.write(bytes(BUFFER))
    with pytest.raises(OSError, match="Bad file descriptor"):
        for _ in range(8):
            f.write(bytes(BUFFER))
        f.close()


def test_bytes_bounced_between_runs_of_own_memory_share_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ends of many large tensors queue up ahead of the writer in one bounce buffer,
    not one buffer each (with four buffers the caller would wait at the fifth); and
    the file comes out right."""
    memory = mmap.mmap(-1, 3 * 4096)
    memory.write(os.urandom(3 * 4096))
    tensor = memoryview(memory)[100 : 100 + 2 * 4096]  # in step after 100 bytes of file
    pieces = [os.urandom(100)] + [tensor] * (2 * writes.DirectFile.BUFFERS + 1)

    blocked = tmp_path / "blocked.bin"
    with monkeypatch.context() as m:
        m.setattr(writes.DirectFile, "_drain", lambda self: None)  # nothing written
        f = create_durable(blocked)
        assert isinstance(f, writes.DirectFile)
        writer = threading.Thread(target=lambda: [f.write(p) for p in pieces], daemon=True)
        writer.start()
        writer.join(timeout=10)
        assert not writer.is_alive(), "the caller waits for a bounce buffer"
        jobs = list(f._full.queue)
        assert len(jobs) == 2 * (len(pieces) - 1)  # bounced, own memory, bounced, ...
        assert all(len(data) % 4096 == 0 and bounce is None for data, bounce in jobs)
        os.close(f._fd)

    with create_durable(tmp_path / "f.bin") as f:
        for piece in pieces:
            f.write(piece)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(p) for p in pieces)


@pytest.mark.parametrize("lead", [0, 100, 4096, 5000])
def test_memory_in_step_with_the_file_is_written_as_is(tmp_path: Path, lead: int) -> None:
    """Page-aligned memory at a page-aligned file offset goes out without a bounce copy;
    the bytes around it still do; the file is the same."""
    memory = mmap.mmap(-1, 3 * BUFFER)
    memory.write(os.urandom(3 * BUFFER))
    view = memoryview(memory)
    head = os.urandom(lead)
    with create_durable(tmp_path / "f.bin") as f:
        f.write(head)
        f.write(view[lead : lead + 2 * BUFFER + 5])  # address and file offset agree mod 4096
        f.write(view[1:4097])  # out of step: copied
        f.write(b"tail")
    assert (tmp_path / "f.bin").read_bytes() == b"".join(
        [head, view[lead : lead + 2 * BUFFER + 5], view[1:4097], b"tail"]
    )


def test_read_ahead_follows_reads_and_mapped_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper thread asks for pages up to a window ahead of the reader, whether it
    reads (`readinto`) or maps the file and says where it is (`reading_at`)."""
    advised: list[int] = []
    seen = threading.Condition()
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            with seen:
                advised.append(offset + length)
                seen.notify_all()
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    size = 4 * DropBehindFile._AHEAD
    path = tmp_path / "f.bin"
    with open(path, "wb") as out:
        out.truncate(size)

    def reaches(end: int) -> bool:
        with seen:
            return seen.wait_for(lambda: max(advised, default=0) >= end, timeout=10)

    with DropBehindFile(path) as f:
        f.read(8)  # a header: no read-ahead yet
        time.sleep(0.05)
        assert not advised
        f.readinto(bytearray(1))
        assert reaches(DropBehindFile._AHEAD)
        time.sleep(0.05)
        assert max(advised) <= DropBehindFile._AHEAD + DropBehindFile._STEP, "paced"
        f.readinto(bytearray(DropBehindFile._AHEAD))
        assert reaches(2 * DropBehindFile._AHEAD)
        f.reading_at(3 * DropBehindFile._AHEAD)
        assert reaches(size)


def test_no_read_ahead_for_a_file_read_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-ahead would read the bytes that direct reads read again."""
    advised: list[int] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append(offset)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    with DropBehindFile(path) as f:
        assert f.direct() is not None, "this filesystem has O_DIRECT"
        f.readinto(bytearray(1000))
        f.reading_at(5000)
        time.sleep(0.05)
    assert not advised


def test_read_direct_fills_page_aligned_memory(tmp_path: Path) -> None:
    data = os.urandom(3 * BUFFER + 100)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, 2 * BUFFER)
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        reads.read_direct(fd, 4096, memoryview(memory))
        assert memory[:] == data[4096 : 4096 + 2 * BUFFER]
        with pytest.raises(EOFError):
            reads.read_direct(fd, 2 * BUFFER, memoryview(memory))


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 70_000])
@pytest.mark.parametrize("length", [0, 1, 4096, reads.BOUNCE])
def test_read_bounced_reads_any_range(tmp_path: Path, offset: int, length: int) -> None:
    """Any offset and length up to BOUNCE, in one request; past the end: EOFError."""
    data = os.urandom(offset + length + 10)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        assert reads.read_bounced(fd, offset, length) == data[offset : offset + length]
        with pytest.raises(EOFError):
            reads.read_bounced(fd, offset + 11, length or 1)


def test_direct_reads_refused_go_on_through_the_page_cache(tmp_path: Path) -> None:
    """A read direct I/O refuses (here: memory that is not page-aligned) is done through
    the page cache instead, and so are the next ones."""
    data = os.urandom(3 * 4096)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = bytearray(2 * 4096)
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        reads.read_direct(fd, 4096, memoryview(memory)[1:4097])
        assert memory[1:4097] == data[4096:8192]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert reads.read_bounced(fd, 5, 100) == data[5:105]


def test_the_writer_takes_what_is_queued_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to 64 jobs or _GATHER bytes per call, and it knows when no more will come."""
    monkeypatch.setattr(writes.DirectFile, "_drain", lambda self: None)
    f = create_durable(tmp_path / "f.bin")
    assert isinstance(f, writes.DirectFile)
    page = np.zeros(4096, dtype=np.uint8)
    for _ in range(70):
        f._full.put((page, None))
    f._full.put(None)
    assert [(len(jobs), more) for jobs, more in (f._gather(), f._gather())] == [
        (64, True),
        (6, False),
    ]
    big = np.zeros(writes.DirectFile._GATHER, dtype=np.uint8)
    f._full.put((page, None))
    f._full.put((big, None))
    f._full.put((page, None))
    assert [len(jobs) for jobs, _ in (f._gather(), f._gather())] == [2, 1]
    os.close(f._fd)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 << 20), min_size=1, max_size=6),
    lead=st.sampled_from([0, 64, 4096 - 8]),
    shift=st.sampled_from([0, 1, 64, 512, 4095]),
)
def test_destinations_that_follow_each_other_are_read_as_one(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], lead: int, shift: int
) -> None:
    """The row runs of a shard: destinations next to each other in the file and in
    memory. They are read in few large requests (the pages they share once), every byte
    lands where it belongs, and each one's callback runs once, after its bytes are in.
    ``shift``: memory out of step with the file (read early and moved into place), or
    in step at a finer alignment than a page (which the filesystem may accept). The
    memory around the destinations is left alone."""
    total = sum(sizes)
    data = os.urandom(lead + total)
    path = tmp_path_factory.mktemp("runs") / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, lead + shift + total + 4096)
    base = np.frombuffer(memory, dtype=np.uint8)
    address = base.ctypes.data + lead + shift
    done: list[int] = []
    requests = []
    preadv = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        requests.append(len(buffers[0]))
        return preadv(fd, buffers, offset)

    parallel = reads.ParallelReads()
    with DropBehindFile(path) as f, pytest.MonkeyPatch.context() as patch:
        patch.setattr(reads.os, "preadv", counted)
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        at = 0
        for i, size in enumerate(sizes):
            dest = memoryview(memory)[lead + shift + at : lead + shift + at + size]

            def then(i: int = i, dest: memoryview = dest, start: int = lead + at) -> None:
                assert dest == data[start : start + len(dest)], f"part {i} not in yet"
                done.append(i)

            parallel.start(fd, lead + at, dest, address + at, then, str(path))
            at += size
        parallel.settle()
        parallel.close()
    assert sorted(done) == list(range(len(sizes)))
    assert memory[lead + shift : lead + shift + total] == data[lead:]
    assert not any(memory[: lead + shift]) and not any(memory[lead + shift + total :])
    pages = -(-(lead % 4096 + total) // 4096)
    assert len(requests) <= pages // (reads.BOUNCE // 4096) + 3  # whole pieces and the ends


def test_the_filesystem_s_direct_io_alignment_is_what_it_accepts(tmp_path: Path) -> None:
    """`direct.alignment` reports powers of two up to a page; a direct read at exactly
    that alignment (not a page's) is accepted and reads the right bytes."""
    data = os.urandom(1 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, 1 << 20)
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        at_memory, at_offset = direct.alignment(fd)
        assert all(0 < n <= mmap.PAGESIZE and not n & (n - 1) for n in (at_memory, at_offset))
        step = max(at_memory, at_offset)
        reads.read_direct(fd, step, memoryview(memory)[at_memory : at_memory + 8 * step])
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT, "the read was refused"
        assert memory[at_memory : at_memory + 8 * step] == data[step : 9 * step]


def _requests_recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (address, length) of the buffer of each read request from now on."""
    into: list[tuple[int, int]] = []
    preadv = os.preadv

    def recorded(fd: int, buffers: list[memoryview], offset: int) -> int:
        into.append((np.frombuffer(buffers[0], dtype=np.uint8).ctypes.data, len(buffers[0])))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(reads.os, "preadv", recorded)
    return into


def test_memory_in_step_at_the_filesystem_s_alignment_is_read_into_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination whose address and file offset differ by a multiple of the direct-I/O
    alignment the filesystem reports, but not of a page, is read without a bounce."""
    size = 4 << 20
    data = os.urandom(size + 8192)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, size + 8192)
    base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    into = _requests_recorded(monkeypatch)
    parallel = reads.ParallelReads()
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        at_memory, at_offset = direct.alignment(fd)
        if max(at_memory, at_offset) == mmap.PAGESIZE:
            pytest.skip("this filesystem wants page-aligned direct I/O")
        offset, lead = 4096 + 64, 4096 - max(at_memory, at_offset) + 64  # in step, not by a page
        dest = memoryview(memory)[lead : lead + size]
        parallel.start(fd, offset, dest, base + lead, lambda: None, str(path))
        parallel.settle()
        parallel.close()
    assert memory[lead : lead + size] == data[offset : offset + size]
    in_place = sum(n for address, n in into if base <= address < base + len(memory))
    assert in_place >= size - 2 * mmap.PAGESIZE, "only the ends may go through a bounce"


@pytest.mark.parametrize(("mib", "tail"), [(8, 0), (8, 777), (72, 777)])
@pytest.mark.parametrize("shift", [1, 64, 448, 4032])
def test_memory_out_of_step_is_read_into_early_and_moved_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int, mib: int, tail: int
) -> None:
    """A large destination out of step with the file, moved into place in one segment
    or (72 MiB) in two: nearly all its bytes are read straight into its own memory (not
    a bounce buffer), land in place, and the memory around it is left as it was."""
    size = (mib << 20) - 100 + tail  # from offset 4096 + 100: ends ``tail`` past 512 B
    data = os.urandom(size + 8192)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, size + 16384)
    memory.write(b"\xa5" * len(memory))
    base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    into = _requests_recorded(monkeypatch)
    offset, lead = 4096 + 100, 4096 + 100 + shift
    done = threading.Event()
    _read_all(path, [(offset, memoryview(memory)[lead : lead + size], base + lead, done.set)])
    assert done.is_set()
    assert memory[lead : lead + size] == data[offset : offset + size]
    assert memory[:lead] == b"\xa5" * lead and memory[lead + size :] == b"\xa5" * (
        len(memory) - lead - size
    )
    in_place = sum(n for address, n in into if base <= address < base + len(memory))
    assert in_place >= size - 4 * mmap.PAGESIZE, "only the ends may go through a bounce"


Read = tuple[int, memoryview, int, Callable[[], None]]  # offset, memory, its address, then


def _read_all(path: Path, started: list[Read]) -> None:
    """Start the reads of ``path`` with direct I/O, in order, then settle."""
    parallel = reads.ParallelReads()
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        try:
            for offset, dest, address, then in started:
                parallel.start(fd, offset, dest, address, then, str(path))
            parallel.settle()
        finally:
            parallel.close()


def _parts_of_one_run(
    path: Path, memory: mmap.mmap, thens: list[Callable[[], None]], size: int
) -> None:
    """Read ``len(thens)`` destinations of ``size`` bytes that follow each other in the
    file and in ``memory``, then settle."""
    address = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    views = [memoryview(memory)[i * size : (i + 1) * size] for i in range(len(thens))]
    _read_all(path, [(i * size, v, address + i * size, t)
                     for i, (v, t) in enumerate(zip(views, thens, strict=True))])  # fmt: skip


@pytest.mark.parametrize("size", [0, 100, 8192])
def test_a_failing_callback_leaves_the_others_of_its_run_told(tmp_path: Path, size: int) -> None:
    """A destination whose check fails (here: its callback raises), zero-size ones too:
    the error comes from settle(), and the other destinations read with it are still
    told that their bytes are in."""
    data = os.urandom(1 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, 1 << 20)
    told: list[int] = []

    def bad() -> None:
        raise ValueError("checksum mismatch")

    with pytest.raises(ValueError, match="checksum mismatch"):
        _parts_of_one_run(path, memory, [lambda: told.append(0), bad,
                                         lambda: told.append(2)], size)
    assert sorted(told) == [0, 2]
    assert memory[: 3 * size] == data[: 3 * size]


def test_a_large_destination_is_read_without_waiting_for_a_flush(tmp_path: Path) -> None:
    """Destinations wait for others to join them only up to a few requests' worth."""
    size = 32 << 20
    path = tmp_path / "f.bin"
    with path.open("wb") as f:
        f.truncate(size)
    memory = mmap.mmap(-1, size)
    address = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    ready = threading.Event()
    parallel = reads.ParallelReads()
    with DropBehindFile(path) as f:
        fd = f.direct()
        assert fd is not None, "this filesystem has O_DIRECT"
        parallel.start(fd, 0, memoryview(memory), address, ready.set, str(path))
        assert ready.wait(60), "the read waited for a flush"
        parallel.settle()
        parallel.close()


@pytest.mark.parametrize("size", [200 << 10, 8 << 20])
@pytest.mark.parametrize("shift", [0, 64, 100])
def test_memory_read_into_twice_holds_the_later_bytes_and_each_callback_its_own(
    tmp_path: Path, size: int, shift: int
) -> None:
    """Tied weights: one memory read into twice, the same bytes (a tied tensor under two
    names) or others (tied weights restored from untied ones). Out of step, the two
    reads' early landings and moves mixed: wrong bytes in most trials (found by an
    attack on the read path)."""
    data = os.urandom(2 * size + 8192)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, size + 8192)
    memory.write(b"\xa5" * len(memory))
    base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    at = 4096 + shift
    dest = memoryview(memory)[at : at + size]
    for first, second in ((4096, 4096), (4096, 4096 + size)):  # the same bytes, others
        seen: list[bool] = []

        def check(offset: int, seen: list[bool] = seen) -> Callable[[], None]:
            return lambda: seen.append(dest == data[offset : offset + size])

        _read_all(path, [(o, dest, base + at, check(o)) for o in (first, second)])
        assert seen == [True, True], "each callback sees its own read's bytes"
        assert dest == data[second : second + size]
        assert memory[:at] == b"\xa5" * at and memory[at + size :] == b"\xa5" * (8192 - at)


def test_direct_reads_refused_on_every_helper_at_once_all_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Helpers whose direct reads were all refused: the first turns direct I/O off for
    the descriptor; the others, seeing it off already, raised EINVAL instead of trying
    again (half the trials, found by an attack on the read path)."""
    size = 32 << 20  # 8 requests, 4 at once
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    # said to accept any memory: reads go straight into memory the disk refuses
    monkeypatch.setattr(reads.direct, "alignment", lambda fd: (1, 512))
    for _ in range(5):
        memory = mmap.mmap(-1, size + 4096)
        base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
        done = threading.Event()
        dest = memoryview(memory)[1 : 1 + size]
        _read_all(path, [(0, dest, base + 1, done.set)])
        assert done.is_set() and dest == data


def test_a_failing_callback_leaves_the_others_of_its_bounce_read_told(tmp_path: Path) -> None:
    """Small destinations that follow each other in the file but not in memory share one
    bounce read: one whose callback raises left the next unfilled and untold."""
    data = os.urandom(1 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    memory = mmap.mmap(-1, 1 << 20)
    base = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    told: list[int] = []

    def bad() -> None:
        raise ValueError("checksum mismatch")

    thens = [lambda: told.append(0), bad, lambda: told.append(2)]
    # gaps in memory: not one run
    started = [(100 * i, memoryview(memory)[1000 * i : 1000 * i + 100], base + 1000 * i, then)
               for i, then in enumerate(thens)]  # fmt: skip
    with pytest.raises(ValueError, match="checksum mismatch"):
        _read_all(path, started)
    assert told == [0, 2]
    assert memory[2000:2100] == data[200:300]
