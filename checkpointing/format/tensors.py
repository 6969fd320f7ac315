"""Safetensors files, written by streaming and read straight into tensors.

Why hand-written instead of ``safetensors.torch.save_file``/``load_file``: those build
the whole file image (or a copy of every tensor) in memory, doubling peak memory, and
cannot read into tensors that already exist. The files are standard safetensors (8-byte
little-endian header length, JSON header padded with spaces to 8 bytes, or to a page
boundary for files of 1 MiB and more, then the data; see `data_offsets`), so
``safetensors.safe_open`` reads them without this library. Dtypes safetensors lacks
(complex128, float8_e8m0, ...) are stored as ``U8`` bytes; the commit record keeps the
real dtype.

Checksums are xxh3-64 (about 10 GB/s, far above disk speed), taken per segment: the
header, then each tensor's bytes. A file's checksum is the xxh3-64 of its segment
digests (8 bytes each, big-endian, in file order), so a partial restore verifies exactly
the bytes it reads and a full scan verifies the file in one pass.
"""

from __future__ import annotations

import dataclasses
import io
import json
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import torch
import xxhash

from checkpointing.errors import CorruptCheckpointError
from checkpointing.format.record import FileInfo
from checkpointing.format.tree import Blob

CHECKSUM_ALGORITHM = "xxh3_64"
_CHUNK = 16 << 20  # bytes per write/read call: I/O-bound, and fine-grained write/drop-behind
_PAGE = 4096
_SMALL = 64 << 10  # bytes below which a tensor is hashed inline and written in a batch
_BATCH = 1 << 20  # bytes of small tensors written together
_ALIGN_DATA_FROM = 1 << 20  # bytes of data from which a file's data starts page-aligned
_ALIGN_TENSORS = 64  # ... and its tensors of 64 bytes or more start on a cache line
_IN_PLACE_FROM = 1 << 20  # ... or, from this size, at their memory's page offset

# A file's data in order: (the blob, or None for padding; start; end), offsets from the data
_Runs = Sequence[tuple[Blob | None, int, int]]

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}


def digest(data: memoryview | bytes | bytearray) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def combine(digests: Iterable[str]) -> str:
    """A file's checksum from its segment digests, in file order."""
    return xxhash.xxh3_64_hexdigest(b"".join(bytes.fromhex(d) for d in digests))


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in checkpoint")
    return dtype


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach()
    if flat.element_size() in _SAME_SIZE_INT:  # copy kernels exist for every int type
        flat = flat.view(_SAME_SIZE_INT[flat.element_size()])
    flat = flat.reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    if flat.stride(0) != 1:  # a 1-element view may keep its stride: is_contiguous() says yes
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def data_offsets(blobs: Sequence[Blob]) -> list[int]:
    """Where each blob's bytes start, counted from the start of a file's data.

    Back to back, except in files of 1 MiB of data or more (whose data starts on a page,
    see `write_file`), where padding entries fill gaps (safetensors allows no holes):

    - a contiguous CPU tensor of 1 MiB or more starts where the file's page offset
      equals its address's page offset, so direct I/O writes it from the tensor itself,
      without a copy into a bounce buffer (`fastio.files`): a durable 1 GB save
      took 0.465 s against 0.548 s copied, the raw disk 0.505 s (A/B, 7 rounds);
    - other tensors of 64 bytes or more start on a 64-byte boundary. An async save's
      snapshot is laid out like the file, so that it is written with direct I/O as is;
      copying into it at addresses off the cache line was 1.25x slower (an Adam
      ``step`` scalar shifts every tensor after it by 4 bytes).
    """
    align = sum(b.nbytes for b in blobs) >= _ALIGN_DATA_FROM
    offsets, end = [], 0
    for blob in blobs:
        if align and blob.nbytes >= _IN_PLACE_FROM and _in_memory(blob.tensor):
            end += (blob.tensor.data_ptr() - end) % _PAGE
        elif align and blob.nbytes >= _ALIGN_TENSORS:
            end += -end % _ALIGN_TENSORS
        offsets.append(end)
        end += blob.nbytes
    return offsets


def _in_memory(tensor: torch.Tensor) -> bool:
    """Whether `byte_view` gives the tensor's own memory (no copy)."""
    return tensor.is_cpu and tensor.is_contiguous()


def write_file(f: BinaryIO, blobs: Sequence[Blob], filename: str) -> FileInfo:
    """Stream ``blobs`` into ``f`` as one safetensors file.

    Sets ``file``, ``key`` and ``checksum`` on every tree node of every blob. Memory
    beyond the tensors themselves: one tensor's contiguous copy when it is strided, or
    its host copy when it lives on an accelerator.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    runs: list[tuple[Blob | None, int, int]] = []  # see _Runs
    taken = {blob.key for blob in blobs}
    end = 0
    for blob, start in zip(blobs, data_offsets(blobs), strict=True):
        if start > end:
            pad = f"__pad{len(header)}__"
            while pad in taken:  # a tensor of the state has that name
                pad += "_"
            header[pad] = {"dtype": "U8", "shape": [start - end], "data_offsets": [end, start]}
            runs.append((None, end, start))
        dtype = _SAFETENSORS_DTYPES.get(blob.tensor.dtype)
        shape = list(blob.tensor.shape) if dtype else [blob.nbytes]
        end = start + blob.nbytes
        header[blob.key] = {"dtype": dtype or "U8", "shape": shape, "data_offsets": [start, end]}
        runs.append((blob, start, end))
    head = json.dumps(header, separators=(",", ":")).encode()
    # Large files start their data on a page boundary: page-aligned tensor memory (an
    # async save's snapshot) is then written with direct I/O, without a copy.
    align = _PAGE if end >= _ALIGN_DATA_FROM else 8
    head += b" " * (-(8 + len(head)) % align)
    head = struct.pack("<Q", len(head)) + head
    _write_all(f, memoryview(head))
    image = _image(runs, end)
    with _Hasher() as hasher:  # hashing overlaps the writes: both release the GIL
        hasher.add(memoryview(head))
        if image is None:
            _write_runs(f, runs, hasher)
        else:
            _write_image(f, image, runs, hasher)
    digests = hasher.digests
    for (run, _, _), checksum in zip(runs, digests[1:], strict=True):
        if run is not None:
            for node in run.nodes:
                node.update(file=filename, key=run.key, checksum=checksum)
    return FileInfo(len(head) + end, digests[0], combine(digests))


def _write_runs(f: BinaryIO, runs: _Runs, hasher: _Hasher) -> None:
    """Hash and write the runs one by one, small ones batched (`_coalesced`)."""

    def pieces() -> Iterator[memoryview]:
        for run, start, stop in runs:
            if run is None:
                data = memoryview(bytes(stop - start))
            else:
                data = byte_view(run.tensor if run.tensor.is_cpu else run.tensor.cpu())
            hasher.add(data)
            yield data

    for data in _coalesced(pieces()):
        _write_all(f, data)


def _write_image(f: BinaryIO, image: memoryview, runs: _Runs, hasher: _Hasher) -> None:
    """Hash the runs of ``image`` one by one; write it in whole chunks as hashing gets there."""
    flushed = 0
    for _, start, stop in runs:
        hasher.add(image[start:stop])
        if stop - flushed >= _CHUNK:
            cut = stop - (stop - flushed) % _CHUNK
            _write_all(f, image[flushed:cut])
            flushed = cut
    _write_all(f, image[flushed:])


def _coalesced(pieces: Iterable[memoryview]) -> Iterator[memoryview]:
    """``pieces``, with consecutive small ones joined into one of up to ``_BATCH`` bytes.

    Most of a model's tensors are small (biases, norms, Adam ``step`` scalars), and a
    write call each cost more than their bytes: a durable save of 50 MB in 780 tensors
    took 0.083 s written one by one, 0.066 s batched (A/B, 9 rounds).
    """
    small: list[memoryview] = []
    pending = 0
    for piece in pieces:
        if len(piece) >= _SMALL:
            if small:
                yield memoryview(b"".join(small))
                small, pending = [], 0
            yield piece
            continue
        small.append(piece)
        pending += len(piece)
        if pending >= _BATCH:
            yield memoryview(b"".join(small))
            small, pending = [], 0
    if small:
        yield memoryview(b"".join(small))


def _image(runs: _Runs, size: int) -> memoryview | None:
    """The file's data as one run of memory, when its tensors already lie there at their
    file offsets with zeros between them: an async save's snapshot arena
    (`checkpointing.snapshot`). Written as one run, the file needs a few large writes
    instead of a small one wherever a tensor ends mid-page (364 of 571 writes at 1 GB)."""
    if size < _ALIGN_DATA_FROM:
        return None  # small files gain nothing
    placed = [(blob.tensor, start) for blob, start, _ in runs if blob is not None]
    storage = placed[0][0].untyped_storage()
    base = placed[0][0].data_ptr()  # the first blob starts the data
    for tensor, start in placed:
        if not (
            tensor.is_cpu
            and tensor.is_contiguous()
            and tensor.untyped_storage().data_ptr() == storage.data_ptr()
            and tensor.data_ptr() == base + start
        ):
            return None
    offset = base - storage.data_ptr()
    if offset + size > storage.nbytes():
        return None
    image = byte_view(torch.empty(0, dtype=torch.uint8).set_(storage, offset, (size,), (1,)))
    if any(any(image[start:stop]) for blob, start, stop in runs if blob is None):
        return None  # padding must be zeros
    return image


class _Hasher:
    """Digests of byte runs, in order: large runs on a helper thread, small ones inline
    (handing them over cost more than hashing them)."""

    def __init__(self) -> None:
        self.digests: list[str] = []  # complete once the ``with`` block has exited
        self._todo: queue.Queue[tuple[int, memoryview] | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpointing-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            try:
                self.digests[job[0]] = digest(job[1])
            except BaseException as e:  # re-raised by __exit__
                self._error = e

    def add(self, data: memoryview) -> None:
        if len(data) < _SMALL:
            self.digests.append(digest(data))
        else:
            self.digests.append("")
            self._todo.put((len(self.digests) - 1, data))

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _write_all(f: BinaryIO, data: memoryview) -> None:
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        while chunk:
            written = f.write(chunk)
            if written is None:  # pragma: no cover - non-blocking files only
                continue
            chunk = chunk[written:]


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
        n = f.readinto(dest[pos : pos + _CHUNK])  # type: ignore[attr-defined]
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
            _write_all(out, chunk)
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
                item: bytes | BaseException = self._src.read(_CHUNK)
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
    buf = bytearray(_CHUNK)
    size = 0
    while n := f.readinto(buf):  # type: ignore[attr-defined]
        hasher.update(memoryview(buf)[:n])
        size += n
    return size, hasher.hexdigest()


def file_checksums(f: BinaryIO, filename: str, *, opaque: bool = False) -> tuple[str, str]:
    """(header checksum, file checksum) of a whole safetensors file, read once in pieces
    of `_CHUNK` bytes; of a file that is not ours (``opaque``), ("", its
    `stream_checksum`)."""
    size = f.seek(0, 2)
    if opaque:
        f.seek(0)
        return "", stream_checksum(f)[1]
    head, entries = read_header(f, filename, size)
    digests = [digest(head)]
    buf = memoryview(bytearray(min(_CHUNK, size)))
    for entry in sorted(entries.values(), key=lambda e: e.start):
        hasher = xxhash.xxh3_64()
        f.seek(entry.start)
        for start in range(entry.start, entry.end, _CHUNK):
            piece = buf[: min(_CHUNK, entry.end - start)]
            if f.readinto(piece) != len(piece):  # type: ignore[attr-defined]
                raise CorruptCheckpointError(f"{filename}: file is truncated")
            hasher.update(piece)
        digests.append(hasher.hexdigest())
    return digests[0], combine(digests)
