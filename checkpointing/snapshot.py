"""An async save's snapshot: host copies of the state, reused from one save to the next.

The training thread pays only for the copy. Buffers are kept between saves (keyed by the
tensor's place in the state, reallocated only when its shape or dtype changes), so once
warm a save allocates nothing; tensors on an accelerator are staged into pinned host
buffers on a side stream. At most one save is in flight: the next one waits for it,
which is also what makes reusing the buffers safe.
"""

from __future__ import annotations

import mmap
import threading

import torch

from checkpointing.format.tensors import data_offsets
from checkpointing.format.tree import Blob


class SnapshotBuffers:
    """Host copies of the tensors of a state, reused from one save to the next.

    The tensors bound for one file share one page-aligned allocation, laid out as the
    file lays out its data (which starts on a page boundary), so a local save writes
    them with direct I/O straight from there, in a few large writes and without a
    bounce copy that would compete with the training thread's copy for memory bandwidth
    (`format.tensors.write_file`, `fastio.writes`).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._arenas: dict[str, tuple[object, dict[str, torch.Tensor]]] = {}

    def snapshot(self, blobs: list[Blob]) -> list[Blob]:
        """Copies of ``blobs`` whose tensors the caller may mutate right after."""
        by_file: dict[str, list[Blob]] = {}
        for blob in blobs:
            by_file.setdefault(blob.group, []).append(blob)
        # Buffers of tensors this save leaves out (an incremental save refers to their
        # earlier copy) are freed rather than held for a save that may never want them.
        wanted = {(blob.group, blob.key) for blob in blobs}
        left_out: list[object] = [a for g, a in self._arenas.items() if g not in by_file]
        left_out += [b for k, b in self._buffers.items() if k not in wanted]
        self._arenas = {g: a for g, a in self._arenas.items() if g in by_file}
        self._buffers = {k: b for k, b in self._buffers.items() if k in wanted}
        _free_aside(left_out)
        buffers: dict[tuple[str, str], torch.Tensor] = {}
        for group, members in by_file.items():
            arena = self._arena(group, members)
            for blob in members:
                key = (group, blob.key)
                buffers[key] = arena[blob.key] if arena else self.buffer(key, blob.tensor)
        streams: dict[torch.device, torch.cuda.Stream] = {}
        out = []
        for blob in blobs:
            src, buf = blob.tensor, buffers[blob.group, blob.key]
            if src.device.type == "cuda":  # into pinned memory, on a side stream
                stream = streams.get(src.device)
                if stream is None:  # after the work queued so far, once per device
                    stream = streams[src.device] = torch.cuda.Stream(device=src.device)  # type: ignore[no-untyped-call]
                    stream.wait_stream(torch.cuda.current_stream(src.device))
                with torch.cuda.stream(stream):
                    buf.copy_(src, non_blocking=True)
            else:
                buf.copy_(src)
            out.append(Blob(blob.group, blob.key, buf, blob.nodes))  # not replace(): slower
        for stream in streams.values():
            stream.synchronize()
        return out

    def _arena(self, group: str, blobs: list[Blob]) -> dict[str, torch.Tensor] | None:
        """Buffers for the tensors of one file in one allocation, at their offsets in
        the file (`data_offsets`); None when a tensor's offset would not suit its dtype,
        or for accelerator tensors (they are staged in pinned buffers)."""
        layout = [(b.key, b.tensor.dtype, b.tensor.shape) for b in blobs]
        cached = self._arenas.get(group)
        if cached is not None and cached[0] == layout:
            return cached[1]
        offsets = data_offsets(blobs)
        for blob, start in zip(blobs, offsets, strict=True):
            if blob.tensor.device.type != "cpu" or start % blob.tensor.element_size():
                return None
        total = offsets[-1] + blobs[-1].nbytes if blobs else 0
        memory = torch.frombuffer(mmap.mmap(-1, max(total, 1)), dtype=torch.uint8)
        arena = {
            blob.key: memory[start : start + blob.nbytes]
            .view(blob.tensor.dtype)
            .view(blob.tensor.shape)
            for blob, start in zip(blobs, offsets, strict=True)
        }
        self._arenas[group] = (layout, arena)
        return arena

    def buffer(self, key: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        """A host tensor like ``like``, the same one for ``key`` from one save to the next."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.device.type == "cuda")
            self._buffers[key] = buf
        return buf


def _free_aside(buffers: list[object]) -> None:
    """Drop the last references to ``buffers`` on a thread of their own: the kernel takes
    a while to unmap gigabytes, which the training thread should not wait for."""
    if buffers:
        threading.Thread(target=buffers.clear, name="checkpointing-free", daemon=True).start()
