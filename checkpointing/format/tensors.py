"""Safetensors files, written by streaming tensors into them, hashed as they go.

Why hand-written instead of ``safetensors.torch.save_file``/``load_file``: those build
the whole file image (or a copy of every tensor) in memory, doubling peak memory, and
cannot read into tensors that already exist (reading is `format.reader`'s). The files
are standard safetensors (8-byte little-endian header length, JSON header padded with
spaces to 8 bytes, or to a page boundary for files of 1 MiB and more, then the data;
see `data_offsets`), so
``safetensors.safe_open`` reads them without this library. Dtypes safetensors lacks
(complex128, float8_e8m0, ...) are stored as ``U8`` bytes; the commit record keeps the
real dtype.

Checksums are xxh3-64 (far faster than disks), taken per segment: the
header, then each tensor's bytes. A file's checksum is the xxh3-64 of its segment
digests (8 bytes each, big-endian, in file order), so a partial restore verifies exactly
the bytes it reads and a full scan verifies the file in one pass.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import torch
import xxhash

from checkpointing.errors import CorruptCheckpointError
from checkpointing.format.record import FileInfo
from checkpointing.format.tree import Blob

CHECKSUM_ALGORITHM = "xxh3_64"
CHUNK = 16 << 20  # bytes per write/read call: I/O-bound, and fine-grained write/drop-behind
_PAGE = 4096
SMALL = 64 << 10  # bytes below which a tensor is hashed inline and written in a batch
BATCH = 1 << 20  # bytes of small tensors written together
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
      without a copy into a bounce buffer (`fastio.writes`);
    - other tensors of 64 bytes or more start on a 64-byte boundary. An async save's
      snapshot is laid out like the file, so that it is written with direct I/O as is,
      and copying into it stays on cache lines (an Adam ``step`` scalar would shift
      every tensor after it by 4 bytes).
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


PADDING_KEY = "checkpointing.padding"  # in __metadata__: the names of the padding entries


def write_file(f: BinaryIO, blobs: Sequence[Blob], filename: str) -> FileInfo:
    """Stream ``blobs`` into ``f`` as one safetensors file.

    Sets ``file``, ``key`` and ``checksum`` on every tree node of every blob. Memory
    beyond the tensors themselves: one tensor's contiguous copy when it is strided, or
    its host copy when it lives on an accelerator.
    """
    metadata = {"format": "pt"}
    header: dict[str, Any] = {"__metadata__": metadata}
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
    pads = [name for name in header if name.startswith("__pad") and name not in taken]
    if pads:  # so that `format.plain.load_file` tells them from tensors named alike
        metadata[PADDING_KEY] = ",".join(pads)
    head = json.dumps(header, separators=(",", ":")).encode()
    # Large files start their data on a page boundary: page-aligned tensor memory (an
    # async save's snapshot) is then written with direct I/O, without a copy.
    align = _PAGE if end >= _ALIGN_DATA_FROM else 8
    head += b" " * (-(8 + len(head)) % align)
    head = struct.pack("<Q", len(head)) + head
    write_all(f, memoryview(head))
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
    """Hash and write the runs one by one, small ones batched (`coalesced`)."""

    def pieces() -> Iterator[memoryview]:
        for run, start, stop in runs:
            if run is None:
                data = memoryview(bytes(stop - start))
            else:
                data = byte_view(run.tensor if run.tensor.is_cpu else run.tensor.cpu())
            hasher.add(data)
            yield data

    for data in coalesced(pieces()):
        write_all(f, data)


def _write_image(f: BinaryIO, image: memoryview, runs: _Runs, hasher: _Hasher) -> None:
    """Hash the runs of ``image`` one by one; write it in whole chunks as hashing gets there."""
    flushed = 0
    for _, start, stop in runs:
        hasher.add(image[start:stop])
        if stop - flushed >= CHUNK:
            cut = stop - (stop - flushed) % CHUNK
            write_all(f, image[flushed:cut])
            flushed = cut
    write_all(f, image[flushed:])


def coalesced(pieces: Iterable[memoryview]) -> Iterator[memoryview]:
    """``pieces``, with consecutive small ones joined into one of up to ``BATCH`` bytes.

    Most of a model's tensors are small (biases, norms, Adam ``step`` scalars), and a
    write call each costs more than their bytes.
    """
    small: list[memoryview] = []
    pending = 0
    for piece in pieces:
        if len(piece) >= SMALL:
            if small:
                yield memoryview(b"".join(small))
                small, pending = [], 0
            yield piece
            continue
        small.append(piece)
        pending += len(piece)
        if pending >= BATCH:
            yield memoryview(b"".join(small))
            small, pending = [], 0
    if small:
        yield memoryview(b"".join(small))


def _image(runs: _Runs, size: int) -> memoryview | None:
    """The file's data as one run of memory, when its tensors already lie there at their
    file offsets with zeros between them: an async save's snapshot arena
    (`checkpointing.snapshot`). Written as one run, the file needs a few large writes
    instead of a small one wherever a tensor ends mid-page."""
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
        if len(data) < SMALL:
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


def write_all(f: BinaryIO, data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        chunk = data[start : start + CHUNK]
        while chunk:
            written = f.write(chunk)
            if written is None:  # pragma: no cover - non-blocking files only
                continue
            chunk = chunk[written:]
