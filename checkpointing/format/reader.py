"""Reading the arrays of one committed step, verified against its commit record."""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from checkpointing.errors import CorruptCheckpointError
from checkpointing.fastio.reads import ParallelReads
from checkpointing.format.record import Record
from checkpointing.format.schema import numpy_dtype, valid_text
from checkpointing.format.tensors import byte_view, digest, parse_dtype
from checkpointing.format.verify import Entry, read_header, read_into

FileRef = tuple[int, str]  # a data file: (its step, its name in the step's folder)


class StepReader:
    """Reads tensors of a step, each file opened once and only when needed.

    Sizes are always checked against the record; checksums when ``verify`` is set.
    Tensors read without a destination are memoized, so tensors that shared storage when
    saved share it again.

    Tensors of local files with direct I/O are read into their destination, or into a
    new tensor, and verified on helper threads (`fastio.reads.ParallelReads`): they are
    returned before their bytes are in, and `settle` waits for them. New tensors are
    plain ``torch.empty`` ones (their pages fault in as the helpers read into them),
    which beats mapping the file (docs/decisions.md).
    """

    def __init__(
        self,
        record: Record,
        open_file: Callable[[int, str], BinaryIO],
        *,
        verify: bool,
        where: Callable[[int], str],
    ) -> None:
        """``open_file(step, name)`` opens a data file of ``record``'s step or of a step
        it references (`Record.references`); ``where(step)`` names that step's folder in
        error messages."""
        self._record = record
        self._open_file = open_file
        self._verify = verify
        self._where = where
        self._files: dict[FileRef, tuple[BinaryIO, dict[str, Entry]]] = {}
        self._maps: dict[FileRef, mmap.mmap | None] = {}
        self._memo: dict[tuple[FileRef, str], torch.Tensor] = {}
        # (tensor, address, bytes) read into a caller's memory: tied weights read once
        self._read_into: set[tuple[tuple[FileRef, str], int, int]] = set()
        self._reads = ParallelReads()
        self.touched = False  # whether bytes were read into a caller's tensor (``dest``)

    def settle(self) -> None:
        """Wait for the reads still in flight; raise the first of their errors."""
        self._reads.settle()

    def wait(self, ready: threading.Event) -> None:
        """Wait until ``ready`` is set (by a read's ``then``) or a read has failed (its
        error comes from `settle`)."""
        self._reads.flush()
        while not ready.wait(0.005):
            if self._reads.failed():
                return

    def close(self) -> None:
        self._reads.close()
        for f, _ in self._files.values():
            f.close()
        self._files.clear()
        self._maps.clear()
        self._memo.clear()
        self._read_into.clear()

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(
        self,
        tag: str,
        body: dict[str, Any],
        dest: torch.Tensor | None,
        then: Callable[[], None] | None = None,
    ) -> Any:
        """The value of a "tensor" or "ndarray" tree node (see format.tree.unflatten).
        ``then`` (a "tensor" node's) runs once its bytes are in and verified, perhaps on
        a helper thread; not if they fail."""
        if tag == "ndarray":
            dtype = numpy_dtype(body["dtype"])
            nbytes = math.prod(body["shape"]) * dtype.itemsize
            raw = self._tensor({**body, "dtype": "uint8", "shape": [nbytes]}, None, None)
            if dtype.kind == "U":  # its bytes must be code points (numpy fails on others)
                self.settle()
                if not valid_text(raw.numpy(), dtype):
                    raise CorruptCheckpointError(
                        f"{self._path(self._ref(body))}: {body['key']!r} holds invalid text"
                    )
            return raw.numpy().view(dtype).reshape(body["shape"])
        return self._tensor(body, dest, then)

    def check(self, body: dict[str, Any], nbytes: int | None = None) -> None:
        """Check, without reading its bytes, that an array node's bytes are where its
        record says: its file's size and header, the entry, the entry's size (``nbytes``,
        or that of the node's dtype and shape; for a view, that it fits its storage)."""
        entry = self._entry(body)
        size = entry.end - entry.start
        if "stride" in body:
            itemsize = parse_dtype(body["dtype"]).itemsize
            last = body["offset"] + sum(
                (n - 1) * s for n, s in zip(body["shape"], body["stride"], strict=True)
            )
            end = last + 1 if math.prod(body["shape"]) else body["offset"]  # empty: its offset
            if end * itemsize > size:
                raise CorruptCheckpointError(
                    f"{self._path(self._ref(body))}: tensor view {body['key']!r} reaches past "
                    f"the {size} bytes of its storage"
                )
            return
        if nbytes is None:
            nbytes = math.prod(body["shape"]) * parse_dtype(body["dtype"]).itemsize
        if nbytes != size:
            raise CorruptCheckpointError(
                f"{self._path(self._ref(body))}: tensor {body['key']!r} holds {size} bytes, "
                f"its record says {nbytes}"
            )

    def _tensor(
        self, body: dict[str, Any], dest: torch.Tensor | None, then: Callable[[], None] | None
    ) -> torch.Tensor:
        dtype, shape = parse_dtype(body["dtype"]), tuple(body["shape"])
        self.check(body)  # before anything is allocated for it
        if "stride" in body:  # a view into a shared storage blob
            entry = self._entry(body)
            base = self._blob(body, None, torch.uint8, (entry.end - entry.start,))
            view = torch.empty(0, dtype=dtype).set_(
                base.untyped_storage(), body["offset"], shape, tuple(body["stride"])
            )
            return self._then(self._fill(dest, view), then)
        if dest is None:
            return self._blob(body, None, dtype, shape, then)
        if (
            dest.device.type == "cpu"
            and dest.dtype == dtype
            and tuple(dest.shape) == shape
            and dest.is_contiguous()
            and (dest.dim() == 0 or dest.stride(-1) == 1)  # else byte_view would copy
        ):
            return self._blob(body, dest, dtype, shape, then)
        return self._then(self._fill(dest, self._blob(body, None, dtype, shape)), then)

    def _then(self, value: torch.Tensor, then: Callable[[], None] | None) -> torch.Tensor:
        """``value`` once its bytes are in and verified, having run ``then``."""
        if then is not None:
            self.settle()
            then()
        return value

    def _blob(
        self,
        body: dict[str, Any],
        dest: torch.Tensor | None,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        then: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        ref = self._ref(body)
        memo_key = (ref, body["key"])
        if dest is None and memo_key in self._memo:
            known = self._memo[memo_key]
            if (known.dtype, tuple(known.shape)) != (dtype, shape):  # a crafted record
                raise CorruptCheckpointError(
                    f"{self._path(self._ref(body))}: tensor {body['key']!r} is read both as "
                    f"{known.dtype}{list(known.shape)} and as {dtype}{list(shape)}"
                )
            return self._then(known, then)
        self.touched |= dest is not None
        f, _ = self._open(ref)
        entry = self._entry(body)
        path = self._path(ref)
        fd = getattr(f, "direct", lambda: None)()  # a local file with direct I/O
        if fd is not None:
            target = torch.empty(shape, dtype=dtype) if dest is None else dest
            data = byte_view(target)
            if dest is not None:
                into = (memo_key, dest.data_ptr(), len(data))
                if into in self._read_into:  # the same bytes, into the same memory
                    return self._then(dest, then)
                self._read_into.add(into)

            def check() -> None:
                self._check(data, body)
                if then is not None:
                    then()

            self._reads.start(fd, entry.start, data, target.data_ptr(), check, path)
            if dest is None:
                self._memo[memo_key] = target
            return target
        out = None if dest is not None else self._mapped(ref, f, entry, dtype, shape)
        if out is not None:
            data = byte_view(out)
        else:
            out = torch.empty(shape, dtype=dtype) if dest is None else dest.detach()
            data = byte_view(out)
            read_into(f, entry, data, path)
        self._check(data, body)
        if dest is None:
            self._memo[memo_key] = out
        if then is not None:
            then()
        return out

    def _fill(self, dest: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """Copy into ``dest`` when it can take ``value`` as is (e.g. on another device)."""
        if dest is not None and dest.shape == value.shape and dest.dtype == value.dtype:
            self.settle()  # value's bytes must be in
            self.touched = True
            with torch.no_grad():
                dest.copy_(value)
            return dest
        return value

    def _check(self, data: memoryview, body: dict[str, Any]) -> None:
        if self._verify and digest(data) != body["checksum"]:
            raise CorruptCheckpointError(
                f"{self._path(self._ref(body))}: checksum mismatch in tensor {body['key']!r}; "
                f"the file is corrupt. Restore another step (all_steps()) or a copy."
            )

    def _mapped(
        self, ref: FileRef, f: BinaryIO, entry: Entry, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor | None:
        """A tensor over a private (copy-on-write) mapping of a local file without direct
        I/O (tmpfs), or None.

        Without a destination, mapping beats allocating and reading through the page
        cache: no fresh memory to fault in, no copy out of the page cache (what
        ``safetensors.load_file`` does too). Pages are read when first touched, by the
        checksum or by the caller, and ahead of that by the file's read-ahead
        (`reading_at`), which keeps the disk busy while the checksum runs. Files on other
        storage, and
        tensors whose offset is not a multiple of their element size, are read instead.
        """
        if ref not in self._maps:
            try:
                fd = f.fileno()
            except (OSError, AttributeError, ValueError):  # not a file on disk
                self._maps[ref] = None
            else:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                mapped.madvise(mmap.MADV_SEQUENTIAL)
                self._maps[ref] = mapped
        whole = self._maps[ref]
        size = entry.end - entry.start
        if (
            whole is None
            or entry.end > len(whole)
            or entry.start % dtype.itemsize
            or size != math.prod(shape) * dtype.itemsize
        ):
            return None
        if not size:
            return torch.empty(shape, dtype=dtype)
        reading_at = getattr(f, "reading_at", None)  # read-ahead of a local file
        if reading_at is not None:
            reading_at(entry.start)
        flat = torch.frombuffer(
            whole, dtype=dtype, count=size // dtype.itemsize, offset=entry.start
        )
        return flat.view(shape)

    def _entry(self, body: dict[str, Any]) -> Entry:
        _, entries = self._open(self._ref(body))
        try:
            return entries[body["key"]]
        except KeyError:
            raise CorruptCheckpointError(
                f"{self._path(self._ref(body))}: tensor {body['key']!r} is missing"
            ) from None

    def _ref(self, body: dict[str, Any]) -> FileRef:
        """Which step's file an array node reads: its own, or an earlier step's."""
        return body.get("step", self._record.step), body["file"]

    def _open(self, ref: FileRef) -> tuple[BinaryIO, dict[str, Entry]]:
        if ref not in self._files:
            step, filename = ref
            record = self._record
            files = record.files if step == record.step else record.references.get(step, {})
            info = files.get(filename)
            if info is None:
                raise CorruptCheckpointError(f"{self._path(ref)} is not in the commit record")
            try:
                f = self._open_file(step, filename)
            except FileNotFoundError as e:
                raise CorruptCheckpointError(
                    f"{self._path(ref)} is missing; the checkpoint is incomplete"
                ) from e
            try:
                # Direct reads first: asked for later, the header's read would have
                # started the page-cache read-ahead, reading bytes nobody uses.
                getattr(f, "direct", lambda: None)()
                size = f.seek(0, 2)
                if size != info.size:
                    raise CorruptCheckpointError(
                        f"{self._path(ref)}: size {size} bytes, the commit record says "
                        f"{info.size}; the file is truncated or corrupt"
                    )
                head, entries = read_header(f, self._path(ref), size)
                if self._verify and digest(head) != info.header_checksum:
                    raise CorruptCheckpointError(
                        f"{self._path(ref)}: header checksum mismatch"
                    )
            except BaseException:
                f.close()
                raise
            self._files[ref] = (f, entries)
        return self._files[ref]

    def _path(self, ref: FileRef) -> str:
        step, filename = ref
        return f"{self._where(step)}/{filename}"
