"""PreemptionWatcher with real signals sent to this process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from checkpointing.errors import InvalidOptionError
from checkpointing.preemption import PreemptionWatcher


def send(signum: int, watcher: PreemptionWatcher) -> None:
    """Signal ourselves and wait until the main thread has run the handler."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not watcher.triggered and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.fixture
def watcher() -> Iterator[PreemptionWatcher]:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    w = PreemptionWatcher()
    yield w
    w.uninstall()
    for s, handler in before.items():
        signal.signal(s, handler)


def test_signal_sets_flag_until_reset(watcher: PreemptionWatcher) -> None:
    watcher.install([signal.SIGUSR1])
    assert not watcher.triggered
    send(signal.SIGUSR1, watcher)
    assert watcher.triggered
    watcher.reset()
    assert not watcher.triggered
    send(signal.SIGUSR1, watcher)
    assert watcher.triggered


def test_default_signals(watcher: PreemptionWatcher) -> None:
    watcher.install()
    assert set(watcher.installed) == {signal.SIGTERM, signal.SIGUSR1}
    assert callable(signal.getsignal(signal.SIGTERM))


def test_chains_to_previous_python_handler(watcher: PreemptionWatcher) -> None:
    calls: list[tuple[int, bool]] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append((signum, watcher.triggered))

    signal.signal(signal.SIGUSR1, previous)
    watcher.install([signal.SIGUSR1])
    send(signal.SIGUSR1, watcher)
    assert calls == [(signal.SIGUSR1, True)]  # called after the flag was set


def test_ignored_previous_handler_is_not_called(watcher: PreemptionWatcher) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    watcher.install([signal.SIGUSR1])
    send(signal.SIGUSR1, watcher)
    assert watcher.triggered
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_uninstall_restores_previous_handlers(watcher: PreemptionWatcher) -> None:
    def previous(signum: int, frame: FrameType | None) -> None:
        pass

    signal.signal(signal.SIGUSR1, previous)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    watcher.install([signal.SIGUSR1, signal.SIGUSR2])
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    assert watcher.installed == ()


def test_uninstall_leaves_a_later_handler_alone(watcher: PreemptionWatcher) -> None:
    def later(signum: int, frame: FrameType | None) -> None:
        pass

    watcher.install([signal.SIGUSR1])
    signal.signal(signal.SIGUSR1, later)
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is later


def test_install_twice_does_not_chain_to_itself(watcher: PreemptionWatcher) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    watcher.install([signal.SIGUSR1])
    watcher.install([signal.SIGUSR1])
    send(signal.SIGUSR1, watcher)  # would recurse forever if it chained to itself
    assert watcher.triggered
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_bad_signal_rolls_back(watcher: PreemptionWatcher) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(InvalidOptionError, match="cannot watch for signal"):
        watcher.install([signal.SIGUSR1, signal.SIGKILL])
    assert signal.getsignal(signal.SIGUSR1) == before
    assert watcher.installed == ()


@pytest.mark.parametrize("method", ["install", "uninstall"])
def test_main_thread_only(watcher: PreemptionWatcher, method: str) -> None:
    """(Uninstalling nothing is allowed anywhere: a manager closed in a worker thread.)"""
    errors: list[BaseException] = []
    if method == "uninstall":
        watcher.install((signal.SIGUSR1,))

    def target() -> None:
        try:
            getattr(watcher, method)()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert len(errors) == 1
    assert isinstance(errors[0], InvalidOptionError)
    assert "main thread" in str(errors[0])


def test_sigterm_with_default_action_does_not_kill() -> None:
    """In a forked child, so that a regression cannot kill the test run."""
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if it survived SIGTERM and saw it
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            child_watcher = PreemptionWatcher()
            child_watcher.install()
            send(signal.SIGTERM, child_watcher)
            code = 0 if child_watcher.triggered else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0
