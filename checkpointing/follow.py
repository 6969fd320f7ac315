"""Following a directory: the new committed steps, as they appear, for evaluation jobs.

Written against the small `Followed` protocol (a `CheckpointManager` is one), so that it
needs nothing else of the manager.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol


class Followed(Protocol):
    """What following needs of a manager."""

    def reload(self) -> None: ...

    def all_steps(self) -> list[int]: ...

    def reading(self, step: int) -> AbstractContextManager[bool]:
        """A reader lease on ``step`` for the block; yields whether the step is there."""
        ...


def iter_new_checkpoints(
    manager: Followed,
    *,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    poll_interval_secs: float = 1.0,
    every_step: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Iterator[int]:
    """Yield committed steps as they appear, each under a reader lease for the loop body.

    By default only the newest new step is yielded (Orbax's semantics); with
    ``every_step`` every new step, in order. After ``timeout`` seconds without a new step
    the iterator ends, unless ``timeout_fn`` is given and returns False (keep waiting).
    Steps deleted before their turn are skipped.
    """
    last: int | None = None
    last_yield = -float("inf")
    while True:
        sleep(max(0.0, last_yield + min_interval_secs - monotonic()))
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            manager.reload()
            new = [s for s in manager.all_steps() if last is None or s > last]
            if new:
                break
            if deadline is not None and monotonic() >= deadline:
                if timeout_fn is None or timeout_fn():
                    return
                deadline = monotonic() + (timeout or 0)
            sleep(poll_interval_secs)
        for step in new if every_step else new[-1:]:
            last = step
            with manager.reading(step) as present:
                if present:
                    last_yield = monotonic()
                    yield step
