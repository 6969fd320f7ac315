"""Preemption signals as a flag the training loop polls.

A cluster scheduler announces preemption with a signal (SIGTERM, or SIGUSR1 on some
launchers) and kills the job a grace period later. Saving inside a signal handler is
unsafe, so the handler only sets a flag; the loop sees it through ``should_save`` (the
`OnPreemption` rule), saves, and exits on its own.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, TypeAlias

from checkpointing.errors import InvalidOptionError

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)

_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class PreemptionWatcher:
    """Records that a preemption signal arrived, chaining to the handlers it replaced.

    A previous Python handler is called after the flag is set. A previous default
    action (SIG_DFL) is *not* performed: for SIGTERM that would kill the process before
    the loop can save, which is the whole point of watching. The loop is then expected
    to save and exit by itself once ``triggered`` is True.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, _Handler] = {}

    @property
    def triggered(self) -> bool:
        """True once any watched signal has arrived (until `reset`)."""
        return self._event.is_set()

    @property
    def installed(self) -> tuple[int, ...]:
        """The signal numbers currently handled by this watcher."""
        return tuple(self._previous)

    def reset(self) -> None:
        """Forget a received signal, e.g. after a save that dealt with it."""
        self._event.clear()

    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        """Handle ``signals``. Installing a signal already handled here does nothing.

        Python runs signal handlers only in the main thread, and only the main thread may
        install them; elsewhere this raises `InvalidOptionError`.
        """
        _require_main_thread("install")
        added: list[int] = []
        for signum in signals:
            if signum in self._previous:
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError, TypeError) as e:
                self._restore(added)
                raise InvalidOptionError(f"cannot watch for signal {signum!r}: {e}") from e
            added.append(signum)

    def uninstall(self) -> None:
        """Put back the handlers that `install` replaced.

        A handler that someone else installed after ours is left in place. With nothing
        installed this does nothing, from any thread (a manager closed in a worker).
        """
        if not self._previous:
            return
        _require_main_thread("uninstall")
        self._restore(list(self._previous))

    def _restore(self, signums: list[int]) -> None:
        for signum in signums:
            previous = self._previous.pop(signum)
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)


def _require_main_thread(action: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise InvalidOptionError(
            f"PreemptionWatcher can {action} signal handlers only from the main thread; "
            f"create the CheckpointManager with save_on_preemption=True in the main thread"
        )
