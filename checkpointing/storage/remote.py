"""Object stores and other fsspec filesystems (``s3://``, ``gs://``, ``memory://``).

Object stores have no atomic rename, so a step's files are written in place and the
commit record is uploaded last: it is the only thing that makes the step visible, and
deleting starts by removing it. A crash mid-upload leaves files without a record, which
readers ignore and the next writer removes (or overwrites when it saves the same step).
Every call is retried on transient failures (see `retry`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import fsspec

from checkpointing.storage.base import StepWriter, Storage, too_large
from checkpointing.storage.retry import retrying

T = TypeVar("T")
BLOCK_SIZE = 64 << 20  # multipart chunk: few requests per file, bounded memory


class _RemoteStepWriter(StepWriter):
    def __init__(self, storage: FsspecStorage, name: str) -> None:
        self._storage = storage
        self._dir = f"{storage.root}/{name}"

    def write(self, filename: str, produce: Callable[[BinaryIO], T]) -> T:
        path = f"{self._dir}/{filename}"

        def attempt() -> T:
            with self._storage.fs.open(path, "wb", block_size=BLOCK_SIZE) as f:
                return produce(f)

        return self._storage.retry(attempt)

    def commit(self, record_name: str, record: bytes) -> None:
        self._storage.retry(
            lambda: self._storage.fs.pipe_file(f"{self._dir}/{record_name}", record)
        )

    def abort(self) -> None:
        self._storage.remove_tree(self._dir)


class FsspecStorage(Storage):
    """A checkpoint directory on any fsspec filesystem."""

    parallelism = 8  # files in flight at once: object stores reward concurrency

    def __init__(
        self, url: str, *, storage_options: dict[str, Any] | None = None, retry_secs: float = 120
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.retry = retrying(retry_secs)

    def _path(self, path: str) -> str:
        return f"{self.root}/{path}"

    def committed(self, record_name: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        found = self.retry(lambda: self.fs.glob(f"{self.root}/*/{record_name}"))
        return sorted({p.rstrip("/").split("/")[-2] for p in found})

    def begin(self, name: str, token: str) -> StepWriter:
        del token  # files go straight to their place; the record alone makes them visible
        return _RemoteStepWriter(self, name)

    def open_read(self, path: str) -> BinaryIO:
        return self.retry(lambda: self.fs.open(self._path(path), "rb", block_size=BLOCK_SIZE))  # type: ignore[no-any-return]

    def read_bytes(self, path: str, limit: int) -> bytes:
        data: bytes = self.retry(
            lambda: self.fs.cat_file(self._path(path), start=0, end=limit + 1)
        )
        if len(data) > limit:
            raise too_large(f"{self.url}/{path}", limit)
        return data

    def write_bytes(self, path: str, data: bytes, *, parents: bool = False) -> None:
        del parents  # object stores have no folders
        self.retry(lambda: self.fs.pipe_file(self._path(path), data))

    def exists(self, path: str) -> bool:
        return bool(self.retry(lambda: self.fs.exists(self._path(path))))

    def listdir(self, path: str) -> list[str]:
        self.fs.invalidate_cache(self._path(path))
        try:
            entries = self.retry(lambda: self.fs.ls(self._path(path), detail=False))
        except FileNotFoundError:
            return []
        return [e.rstrip("/").split("/")[-1] for e in entries]

    def remove(self, path: str) -> None:
        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(path))

        self.retry(attempt)

    def size(self, path: str) -> int:
        return int(self.retry(lambda: self.fs.size(self._path(path))))

    def download(self, path: str, local_path: str) -> None:
        self.retry(lambda: self.fs.get_file(self._path(path), local_path))

    def delete(self, name: str, record_name: str) -> None:
        self.retry(lambda: self.fs.rm_file(self._path(f"{name}/{record_name}")))
        self.remove_tree(self._path(name))

    def remove_tree(self, path: str) -> None:
        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

        self.retry(attempt)

    def cleanup(self, is_step: Callable[[str], bool], record_name: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.retry(lambda: self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []
        committed = set(self.committed(record_name))
        names = [p.rstrip("/").split("/")[-1] for p in entries]
        leftovers = [n for n in names if is_step(n) and n not in committed]
        for name in leftovers:
            self.remove_tree(self._path(name))
        return leftovers

    def lock(self) -> None:
        """Object stores have no lock; one writer per directory is up to the user."""

    def unlock(self) -> None:
        pass
