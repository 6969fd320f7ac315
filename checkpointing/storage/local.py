"""Local disk: write into a hidden temporary directory, fsync, rename into place.

A crash at any moment leaves either the complete step or a ``.tmp-*`` directory that
no listing shows and the next writer removes. Deletion renames the step away first, so
a step is never half-deleted in sight; the files are then removed on a helper thread,
because unlinking a large step is slow, and the next step's writer waits for them to go
so that it finds their space free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import filelock

from checkpointing.errors import CheckpointError, DirectoryLockedError, raise_if_disk_full
from checkpointing.fastio.reads import DropBehindFile
from checkpointing.fastio.writes import create_durable
from checkpointing.storage.base import StepWriter, Storage, too_large

T = TypeVar("T")
logger = logging.getLogger("checkpointing")
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
_STALE_SECS = 3600.0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalStepWriter(StepWriter):
    def __init__(self, root: Path, name: str, token: str) -> None:
        self._root = root
        self._final = root / name
        self._tmp = root / f"{TMP_PREFIX}{name}-{token}"
        self._tmp.mkdir(exist_ok=True)  # the first process of a job creates it
        self.local_dir = self._tmp

    def write(self, filename: str, produce: Callable[[BinaryIO], T]) -> T:
        if "/" in filename:  # sharded/rank<r>.safetensors
            (self._tmp / filename).parent.mkdir(parents=True, exist_ok=True)
        with create_durable(self._tmp / filename) as f:
            return produce(f)  # type: ignore[arg-type]

    def commit(self, record_name: str, record: bytes) -> None:
        with create_durable(self._tmp / record_name) as f:
            f.write(record)
        fsync_dir(self._tmp)
        try:
            os.rename(self._tmp, self._final)
        except OSError as e:
            raise CheckpointError(
                f"cannot move the new checkpoint into place at {self._final}: {e}. "
                f"Remove the foreign directory of that name."
            ) from e
        fsync_dir(self._root)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class LocalStorage(Storage):
    def __init__(self, directory: str | os.PathLike[str], *, create: bool) -> None:
        self.root = Path(directory).expanduser().absolute()
        self.url = str(self.root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self._lock: filelock.FileLock | None = None
        self._removing: list[threading.Thread] = []  # removing deleted steps' files

    def committed(self, record_name: str) -> dict[str, str]:
        """Step folders holding a regular ``record_name``; symbolic links are not steps
        (a link would lead restores and copies outside the directory)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return {}
        found = {}
        for e in entries:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            version = _regular_version(os.path.join(e.path, record_name))
            if version is not None:
                found[e.name] = version
        return found

    def begin(self, name: str, token: str) -> StepWriter:
        self.finish_deletes()
        return _LocalStepWriter(self.root, name, token)

    def _path(self, path: str) -> Path:
        return self.root / path

    def open_read(self, path: str) -> BinaryIO:
        return DropBehindFile(self._path(path), root=self.root)

    def read_bytes(self, path: str, limit: int) -> bytes:
        with self.open_read(path) as f:  # sized by the file, not the limit
            data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        if len(data) > limit:
            raise too_large(f"{self.url}/{path}", limit)
        return data

    def write_bytes(self, path: str, data: bytes, *, parents: bool = False) -> None:
        """Atomically, in a folder reached without following symbolic links (a folder of
        an untrusted checkpoint may be a link to anywhere); missing folders are created
        only with ``parents``, so a write into a step deleted meanwhile fails instead of
        bringing back its folder."""
        folder, _, name = path.rpartition("/")
        tmp = f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            at = _open_folder(self.root, folder, create=parents)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, dir_fd=at)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as f:
                        f.write(data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=at, dst_dir_fd=at)
                os.fsync(at)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=at)
                raise
            finally:
                os.close(at)
        except OSError as e:
            raise_if_disk_full(e, f"cannot write {self.url}/{path}")
            raise

    def exists(self, path: str) -> bool:
        return self._path(path).exists()

    def listdir(self, path: str) -> list[str]:
        """Names in a folder reached without following links; empty if it is missing,
        not a folder, or behind a link (logged)."""
        try:
            at = _open_folder(self.root, path, create=False)
        except FileNotFoundError:
            return []
        except (OSError, CheckpointError) as e:
            logger.warning("not listing %s/%s: %s", self.url, path, e)
            return []
        try:
            return os.listdir(at)
        finally:
            os.close(at)

    def remove(self, path: str) -> None:
        """Remove a file of a folder reached without following links."""
        folder, _, name = path.rpartition("/")
        try:
            at = _open_folder(self.root, folder, create=False)
        except FileNotFoundError:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=at)
        finally:
            os.close(at)

    def size(self, path: str) -> int:
        return self._path(path).stat().st_size

    def delete(self, name: str, record_name: str) -> None:
        doomed = self.root / f"{TMP_PREFIX}{name}-deleting-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, doomed)
        fsync_dir(self.root)
        remover = threading.Thread(
            target=_remove_tree, args=(doomed,), name="checkpointing-delete", daemon=True
        )
        remover.start()
        self._removing.append(remover)

    def finish_deletes(self) -> None:
        """Wait until the files of deleted steps are gone and their space is free."""
        while self._removing:
            self._removing.pop().join()

    def cleanup(self, is_step: Callable[[str], bool], record_name: str) -> list[str]:
        """Remove the temporary files and folders of interrupted saves and deletes, and
        the stale temporary files of small writes (`write_bytes`) interrupted in step
        folders and bookkeeping folders (``.leases``), which readers write too: those
        are removed once an hour old, when no write can still be under way."""
        removed = []
        stale = time.time() - _STALE_SECS
        for entry in os.scandir(self.root):
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.name)
            elif (entry.name.startswith(".") or is_step(entry.name)) and entry.is_dir(
                follow_symlinks=False
            ):
                for inner in os.scandir(entry.path):
                    if (
                        inner.name.startswith(TMP_PREFIX)
                        and inner.is_file(follow_symlinks=False)
                        and inner.stat(follow_symlinks=False).st_mtime < stale
                    ):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(inner.path)
                        removed.append(f"{entry.name}/{inner.name}")
        return removed

    def lock(self) -> None:
        lock = filelock.FileLock(self.root / LOCK_NAME)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout as e:
            raise DirectoryLockedError(
                f"another CheckpointManager is writing to {self.root}. Only one writer per "
                f"directory is allowed; open this one with read_only=True to read."
            ) from e
        self._lock = lock

    def unlock(self) -> None:
        self.finish_deletes()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _regular_version(path: str) -> str | None:
    """The version of a regular file (see `Storage.committed`); None if it is not one."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}"


def _open_folder(root: Path, relative: str, *, create: bool) -> int:
    """A descriptor of the folder ``relative`` below ``root``, reached without following
    symbolic links; missing folders are made when ``create``."""
    at = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in filter(None, relative.split("/")):
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=at)
            inner = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at
            )
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CheckpointError(
                    f"{root}/{relative} is a symbolic link or not a folder; refusing to "
                    f"write through it"
                ) from None
            raise
        finally:
            os.close(at)
        at = inner
    return at


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as e:  # invisible already; the next writer's start-up removes it
        logger.warning("could not remove the deleted step %s: %s", path, e)
