"""Helper threads: one background job at a time, and a parallel map.

Plain threads rather than concurrent.futures: executors refuse work once the interpreter
is shutting down, which is exactly when the atexit hook finishes a save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from checkpointing.errors import CheckpointError

logger = logging.getLogger("checkpointing")
T = TypeVar("T")
R = TypeVar("R")


class JobRunner:
    """Runs one job at a time on a daemon thread (an async save, a mirror's uploads) and
    keeps its failure for the caller."""

    def __init__(self, what: str) -> None:
        self._what = what  # named in errors: "the background {what} of step 5 ..."
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
                logger.debug("background %s of step %d failed", self._what, step, exc_info=True)
                if abandoned.is_set():
                    return  # already reported as timed out
                if hasattr(e, "add_note"):
                    e.add_note(f"(raised by the background {self._what} of step {step})")
                self._error = e

        name = f"checkpointing-{self._what}-{step}"
        self._thread = threading.Thread(target=run, name=name, daemon=True)
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
                    f"the background {self._what} of step {self._step} did not finish in time "
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
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first error is raised."""
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
