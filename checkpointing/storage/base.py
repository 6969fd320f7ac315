"""The storage interface: the only way the manager touches files.

Paths are relative to the checkpoint directory and use ``/``. A step is written through
a `StepWriter`, which keeps it invisible until `StepWriter.commit` has written the commit
record; how that is made atomic is the backend's business (rename on a local disk, the
record uploaded last on an object store).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from checkpointing.errors import CorruptCheckpointError

T = TypeVar("T")


class StepWriter(abc.ABC):
    """Writes the files of one step; nothing is visible before `commit`.

    In a multi-process job every process opens a writer of the same step (same
    ``token``) and writes its own files; only the primary commits or aborts.
    """

    local_dir: Path | None = None  # where other writers (DCP) may add files, if on disk

    @abc.abstractmethod
    def write(self, filename: str, produce: Callable[[BinaryIO], T]) -> T:
        """Create ``filename`` in this step and fill it with ``produce(file)``; the file
        is durable when this returns. May call ``produce`` again on a fresh file to
        retry a transient failure."""

    @abc.abstractmethod
    def commit(self, record_name: str, record: bytes) -> None:
        """Write the commit record last and make the step visible, durably."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far. Safe to call after a failed commit."""


class Storage(abc.ABC):
    """A checkpoint directory."""

    url: str
    parallelism: int = 1  # how many files to write or read at once

    @abc.abstractmethod
    def committed(self, record_name: str) -> dict[str, str]:
        """The subdirectories that hold ``record_name``, each with a version of that
        file: a token that changes when the file is replaced (an inode and time, an
        ETag), so that readers know when a record they hold is no longer the one there."""

    @abc.abstractmethod
    def begin(self, name: str, token: str) -> StepWriter:
        """Start writing the step directory ``name``; writers with the same ``token``
        (one per process of a job) write into the same uncommitted step."""

    @abc.abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """Open a file for reading; it supports seek and readinto.

        A missing file raises `FileNotFoundError`.
        """

    @abc.abstractmethod
    def read_bytes(self, path: str, limit: int) -> bytes:
        """A small file's bytes; `CorruptCheckpointError` (see `too_large`) past
        ``limit`` bytes, read no further: the file may be a crafted one of any size."""

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, *, parents: bool = False) -> None:
        """Replace a small file atomically (never seen half-written). Its folder must
        exist unless ``parents``."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in a directory; empty if it does not exist."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file; no error if it is already gone."""

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def delete(self, name: str, record_name: str) -> None:
        """Delete a step directory; it disappears from listings first."""

    @abc.abstractmethod
    def cleanup(self, is_step: Callable[[str], bool], record_name: str) -> list[str]:
        """Remove leftovers of crashed saves and deletes; return what was removed.

        ``is_step`` tells step directory names, so that foreign files are left alone.
        """

    @abc.abstractmethod
    def lock(self) -> None:
        """Take the writer lock, or raise `DirectoryLockedError` if another holds it."""

    @abc.abstractmethod
    def unlock(self) -> None: ...

    def check_lease(self) -> None:
        """Raise `DirectoryLockedError` if this writer's lock was taken over (object
        stores' leases can be; a local lock cannot)."""
        return None


def too_large(where: str, limit: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where} is larger than the {limit} bytes such a file may have; refusing to read it"
    )
