"""Async save: snapshot the state into reused buffers, persist it on a background thread.

The training thread pays only for the copy. Buffers are kept between saves (keyed by the
tensor's place in the state, reallocated only when its shape or dtype changes), so once
warm a save allocates nothing; tensors on an accelerator are staged into pinned host
buffers on a side stream. At most one save is in flight: the next one waits for it,
which is also what makes reusing the buffers safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from checkpointing.errors import CheckpointError
from checkpointing.format.tensors import data_offsets
from checkpointing.format.tree import Blob

logger = logging.getLogger("checkpointing")
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class SaveStats:
    """Timings of one save, from `CheckpointManager.last_save_stats`.

    ``blocking_secs`` is what the training thread waited (snapshot, or the whole save
    when synchronous); ``background_secs`` is the write, commit and retention after it.
    """

    step: int
    blocking_secs: float
    background_secs: float
    nbytes: int


class SnapshotBuffers:
    """Host copies of the tensors of a state, reused from one save to the next.

    The tensors bound for one file share one page-aligned allocation, laid out as the
    file lays out its data (which starts on a page boundary), so a local save writes
    them with direct I/O straight from there, in a few large writes and without a
    bounce copy that would compete with the training thread's copy for memory bandwidth
    (`format.tensors.write_file`, `storage.local_files`).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._arenas: dict[str, tuple[object, dict[str, torch.Tensor]]] = {}

    def snapshot(self, blobs: list[Blob]) -> list[Blob]:
        """Copies of ``blobs`` whose tensors the caller may mutate right after."""
        by_file: dict[str, list[Blob]] = {}
        for blob in blobs:
            by_file.setdefault(blob.group, []).append(blob)
        buffers: dict[tuple[str, str], torch.Tensor] = {}
        for group, members in by_file.items():
            arena = self._arena(group, members)
            for blob in members:
                key = (group, blob.key)
                buffers[key] = arena[blob.key] if arena else self.buffer(key, blob.tensor)
        stream = None
        out = []
        for blob in blobs:
            src, buf = blob.tensor, buffers[blob.group, blob.key]
            if src.device.type == "cuda":  # into pinned memory, on a side stream
                stream = stream or torch.cuda.Stream(device=src.device)  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream(src.device))
                with torch.cuda.stream(stream):
                    buf.copy_(src, non_blocking=True)
            else:
                buf.copy_(src)
            out.append(Blob(blob.group, blob.key, buf, blob.nodes))  # not replace(): 3x slower
        if stream is not None:
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


class BackgroundWriter:
    """Runs one job at a time on a daemon thread and keeps its failure for the caller."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abandoned = threading.Event()
        self._step: int | None = None
        self._deadline: float | None = None

    @property
    def pending_step(self) -> int | None:
        """The step of the job not waited for yet, running or done: unlike `busy`, it
        does not depend on the job's timing."""
        return self._step if self._thread is not None else None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(
        self, step: int, job: Callable[[Callable[[], bool]], None], timeout: float | None
    ) -> None:
        """Run ``job(abandoned)`` for ``step``; it fails if not done ``timeout`` s from now.

        ``abandoned()`` turns True when the caller gave up on this job (its timeout
        passed): the job must then not commit.
        """
        assert not self.busy, "wait() before starting another job"
        self._abandoned = abandoned = threading.Event()
        self._step = step
        self._deadline = None if timeout is None else time.monotonic() + timeout

        def run() -> None:
            _lower_priority()
            try:
                job(abandoned.is_set)
            except BaseException as e:  # surfaced on the caller's next call
                logger.debug("background save of step %d failed", step, exc_info=True)
                if abandoned.is_set():
                    return  # already reported as timed out
                if hasattr(e, "add_note"):
                    e.add_note(f"(raised by the background save of step {step})")
                self._error = e

        self._thread = threading.Thread(target=run, name=f"checkpointing-save-{step}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the job in flight, keeping its failure for `raise_error`."""
        if self._thread is not None:
            self._thread.join()

    def wait(self) -> None:
        """Wait for the job in flight (up to its deadline); raise its failure, once."""
        if self._thread is not None:
            remaining = None if self._deadline is None else self._deadline - time.monotonic()
            self._thread.join(None if remaining is None else max(remaining, 0.0))
            if self._thread.is_alive():
                self._abandoned.set()
                self._error = CheckpointError(
                    f"the background save of step {self._step} did not finish in time "
                    f"(async_timeout_secs); it was abandoned and will not be committed. "
                    f"Check the storage, or raise the timeout."
                )
            self._thread = None
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the failure of a finished job, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error


def _lower_priority() -> None:
    """Let the training threads win the CPU over this one (Linux nices threads alone)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first error is raised.

    Plain threads rather than concurrent.futures: executors refuse work once the
    interpreter is shutting down, which is exactly when the atexit hook finishes a save.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    todo = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
