"""Reading data files back, checked: headers, whole files, copies.

Every size a header claims is checked against the file's real size before anything is
allocated or read from it (checkpoints are untrusted); whole files are hashed in pieces
of bounded size; copies (downloads, uploads, ``sync``) check each file against its record
in the same pass that copies it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import queue
import struct
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import xxhash

from checkpointing.errors import CorruptCheckpointError
from checkpointing.format.tensors import CHUNK, combine, digest, write_all


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


MAX_HEADER = 100 << 20  # bytes; safetensors' own limit


def read_header(f: BinaryIO, filename: str, size: int) -> tuple[bytes, dict[str, Entry]]:
    """The raw header bytes (for its checksum) and the tensor entries of a file of
    ``size`` bytes. The header's length and every entry's range are checked against the
    file's size before anything is allocated or read from them."""
    f.seek(0)
    raw_len = f.read(8)
    if len(raw_len) != 8:
        raise CorruptCheckpointError(f"{filename}: truncated safetensors header")
    (length,) = struct.unpack("<Q", raw_len)
    if length > min(size - 8, MAX_HEADER):
        raise CorruptCheckpointError(
            f"{filename}: its header claims {length} bytes, the file has {size}"
        )
    body = f.read(length)
    if len(body) != length:
        raise CorruptCheckpointError(f"{filename}: truncated safetensors header")
    return raw_len + body, parse_header(body, filename, size)


def parse_header(body: bytes, filename: str, size: int) -> dict[str, Entry]:
    """The tensor entries of a safetensors header, each inside a file of ``size`` bytes."""
    base = 8 + len(body)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{filename}: unreadable safetensors header ({e})") from None
    if not isinstance(parsed, dict):
        raise CorruptCheckpointError(f"{filename}: unreadable safetensors header")
    entries = {}
    for key, value in parsed.items():
        if key == "__metadata__":
            continue
        offsets = value.get("data_offsets") if isinstance(value, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size - base
            and isinstance(value.get("dtype"), str)
            and isinstance(value.get("shape"), list)
        ):
            raise CorruptCheckpointError(
                f"{filename}: entry {key!r} of its header is malformed or lies outside the file"
            )
        start, end = base + offsets[0], base + offsets[1]
        entries[key] = Entry(value["dtype"], tuple(value["shape"]), start, end)
    return entries


def read_into(f: BinaryIO, entry: Entry, dest: memoryview, filename: str) -> None:
    """Fill ``dest`` with the bytes of ``entry``."""
    if len(dest) != entry.end - entry.start:
        raise CorruptCheckpointError(
            f"{filename}: tensor holds {entry.end - entry.start} bytes, expected {len(dest)}"
        )
    f.seek(entry.start)
    pos = 0
    while pos < len(dest):
        n = f.readinto(dest[pos : pos + CHUNK])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(f"{filename}: file is truncated")
        pos += n


def copy_checked(
    src: BinaryIO,
    out: BinaryIO,
    expected: tuple[int, str, str],
    where: str,
    progress: Callable[[int], object] = lambda n: None,
) -> None:
    """Copy a data file from ``src`` (read sequentially) to ``out``, checking it against
    its (size, header checksum, checksum) on the way: downloads and uploads verify what
    they move in one pass, without reading the copy back."""
    with _ReadAhead(src) as ahead:
        _copy_checked(ahead, out, expected, where, progress)


def _copy_checked(
    src: _ReadAhead,
    out: BinaryIO,
    expected: tuple[int, str, str],
    where: str,
    progress: Callable[[int], object],
) -> None:
    size, header_checksum, checksum = expected
    done = 0

    def copy(n: int, hasher: Any = None) -> None:
        nonlocal done
        if n < 0:
            raise CorruptCheckpointError(f"{where}: its header has overlapping tensors")
        while n:
            chunk = src.read(n)
            if not chunk:
                raise CorruptCheckpointError(f"{where}: {done} bytes, the record says {size}")
            write_all(out, chunk)
            if hasher is not None:
                hasher.update(chunk)
            progress(len(chunk))
            done += len(chunk)
            n -= len(chunk)

    if not header_checksum:  # not a safetensors file: one checksum of the whole
        whole = xxhash.xxh3_64()
        copy(size, whole)
        digests = ["", whole.hexdigest()]
    else:
        head = _Collect()
        copy(min(8, size), head)
        if len(head.data) == 8:  # else read_header says it is truncated
            copy(min(struct.unpack("<Q", head.data)[0], size - 8, MAX_HEADER), head)
        _, entries = read_header(io.BytesIO(bytes(head.data)), where, size)
        segments = [head.hexdigest()]
        for entry in sorted(entries.values(), key=lambda e: e.start):
            copy(entry.start - done)  # nothing lies between tensors in our files
            hasher = xxhash.xxh3_64()
            copy(entry.end - entry.start, hasher)
            segments.append(hasher.hexdigest())
        copy(size - done)
        digests = [segments[0], combine(segments)]
    if src.read(1):
        raise CorruptCheckpointError(f"{where}: longer than the {size} bytes of its record")
    if tuple(digests) != (header_checksum, checksum):
        raise CorruptCheckpointError(f"{where}: checksum mismatch; the file is corrupt")


class _Collect:
    """A hasher that also keeps what it hashed (a header, to parse it)."""

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_64()
        self.data = bytearray()

    def update(self, data: memoryview) -> None:
        self._hasher.update(data)
        self.data += data

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class _ReadAhead:
    """Reads a file sequentially on a helper thread, a few chunks ahead of the consumer,
    so that a copy's reads (network, for a download) overlap its writes (disk): a GCS
    download went from read-then-write to about the slower of the two."""

    _DEPTH = 2

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(self._DEPTH)
        self._pending = memoryview(b"")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: bytes | BaseException = self._src.read(CHUNK)
            except BaseException as e:  # handed to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._chunks.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, n: int) -> memoryview:
        """Up to ``n`` bytes (fewer at a chunk's end); empty at the end of the file."""
        if not self._pending:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._chunks.put(item)  # stays at the end for later reads
                return memoryview(b"")
            self._pending = memoryview(item)
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def __enter__(self) -> _ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_checksum(f: BinaryIO) -> tuple[int, str]:
    """(size, checksum) of a whole file that is not a safetensors file (DCP's shards)."""
    hasher = xxhash.xxh3_64()
    buf = bytearray(CHUNK)
    size = 0
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        hasher.update(memoryview(buf)[:n])
        size += n
    return size, hasher.hexdigest()


def file_checksums(f: BinaryIO, filename: str, *, opaque: bool = False) -> tuple[str, str]:
    """(header checksum, file checksum) of a whole safetensors file, read once in pieces
    of `CHUNK` bytes; of a file that is not ours (``opaque``), ("", its
    `stream_checksum`)."""
    size = f.seek(0, 2)
    if opaque:
        f.seek(0)
        return "", stream_checksum(f)[1]
    head, entries = read_header(f, filename, size)
    digests = [digest(head)]
    buf = memoryview(bytearray(min(CHUNK, size)))
    for entry in sorted(entries.values(), key=lambda e: e.start):
        hasher = xxhash.xxh3_64()
        f.seek(entry.start)
        for start in range(entry.start, entry.end, CHUNK):
            piece = buf[: min(CHUNK, entry.end - start)]
            if f.readinto(piece) != len(piece):  # type: ignore[attr-defined]
                raise CorruptCheckpointError(f"{filename}: file is truncated")
            hasher.update(piece)
        digests.append(hasher.hexdigest())
    return digests[0], combine(digests)
