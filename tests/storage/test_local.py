"""Deleting a step: gone from listings at once, its files removed on a helper thread,
and the space free before the next step is written."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from checkpointing.storage import local
from checkpointing.storage.local import LocalStorage

RECORD = "checkpoint.json"


def committed_step(storage: LocalStorage, name: str) -> None:
    writer = storage.begin(name, "token")
    writer.write("data.bin", lambda f: f.write(b"x" * 10_000))
    writer.commit(RECORD, b"{}")


def hold_removals(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Removals of deleted steps wait for the returned event."""
    release = threading.Event()
    rmtree = local.shutil.rmtree

    def held(path: Path) -> None:
        assert release.wait(10), "the removal was never released"
        rmtree(path)

    monkeypatch.setattr(local.shutil, "rmtree", held)
    return release


def test_delete_hides_at_once_and_the_next_step_waits_for_the_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, create=True)
    committed_step(storage, "step_1")
    release = hold_removals(monkeypatch)

    storage.delete("step_1", RECORD)  # returns while its files are still there
    assert storage.committed(RECORD) == {}
    assert [n for n in os.listdir(tmp_path) if "-deleting-" in n], "removed on the caller"

    began = threading.Event()
    beginner = threading.Thread(target=lambda: (storage.begin("step_2", "t"), began.set()))
    beginner.start()
    assert not began.wait(0.2), "the next step began before the deleted one's space was free"
    release.set()
    beginner.join(10)
    assert began.is_set()
    assert [n for n in os.listdir(tmp_path) if "-deleting-" in n] == []


def test_unlock_waits_for_removals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path, create=True)
    storage.lock()
    committed_step(storage, "step_1")
    release = hold_removals(monkeypatch)
    storage.delete("step_1", RECORD)
    threading.Timer(0.1, release.set).start()
    storage.unlock()
    assert sorted(os.listdir(tmp_path)) == [".lock"]


def test_a_failed_removal_is_logged_and_cleaned_up_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = LocalStorage(tmp_path, create=True)
    committed_step(storage, "step_1")

    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, "checkpointing"):
        m.setattr(local.shutil, "rmtree", refuse)
        storage.delete("step_1", RECORD)
        storage.finish_deletes()
    assert "could not remove the deleted step" in caplog.text
    assert storage.committed(RECORD) == {}

    removed = LocalStorage(tmp_path, create=False).cleanup(lambda name: True, RECORD)
    assert len(removed) == 1 and "-deleting-" in removed[0]
    assert os.listdir(tmp_path) == []
