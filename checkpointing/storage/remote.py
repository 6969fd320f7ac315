"""Object stores and other fsspec filesystems (``s3://``, ``gs://``, ``memory://``).

Object stores have no atomic rename, so a step's files are written in place and the
commit record is uploaded last: it is the only thing that makes the step visible, and
deleting starts by removing it. A crash mid-upload leaves files without a record, which
readers ignore and the writer that next holds the directory's lease removes (or
overwrites when it saves the same step). One writer at a time is ensured by that lease
(`lease`), checked before every commit and delete.

Every call is retried on transient failures (`retry`) and fails with a typed error
(`RemoteUnavailableError`, `RemoteStorageError`). Listings are never cached: other
processes (evaluation jobs, the writer) change the directory, and every listing here
must see their changes. Until a first request has succeeded, a store that does not
answer fails within `FIRST_CONTACT_SECS` rather than the whole retry budget: a wrong
endpoint is a typo to report at once, not an outage to wait out.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import fsspec

from checkpointing.errors import (
    DISK_FULL_ERRNOS,
    CheckpointError,
    DiskFullError,
    InvalidOptionError,
    RemoteStorageError,
    RemoteUnavailableError,
)
from checkpointing.storage.base import StepWriter, Storage, too_large
from checkpointing.storage.lease import WriterLease
from checkpointing.storage.retry import is_transient, retrying

T = TypeVar("T")
BLOCK_SIZE = 64 << 20  # multipart chunk: few requests per file, bounded memory
DISTRIBUTION = "torch-checkpoint-manager"  # this package's name on the package index
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # URL scheme -> extra
RETRY_SECS = 120.0  # how long a failing request is retried once the store has answered
FIRST_CONTACT_SECS = 10.0  # how long the first request may take to get any answer
LEASE_SECS = 30.0


class _RemoteStepWriter(StepWriter):
    def __init__(self, storage: FsspecStorage, name: str) -> None:
        self._storage = storage
        self._dir = f"{storage.root}/{name}"

    def write(self, filename: str, produce: Callable[[BinaryIO], T]) -> T:
        self._storage.check_lease()  # a writer taken over must not overwrite the new one's
        path = f"{self._dir}/{filename}"

        def attempt() -> T:
            with self._storage.fs.open(path, "wb", block_size=BLOCK_SIZE) as f:
                return produce(f)

        return self._storage.retry(attempt)

    def commit(self, record_name: str, record: bytes) -> None:
        self._storage.check_lease()
        self._storage.retry(
            lambda: self._storage.fs.pipe_file(f"{self._dir}/{record_name}", record)
        )

    def abort(self) -> None:
        try:
            self._storage.check_lease()
        except Exception:  # taken over (or unsure): the folder may be the new writer's
            return  # now, and it cleans leftovers itself
        self._storage.remove_tree(self._dir)


class FsspecStorage(Storage):
    """A checkpoint directory on any fsspec filesystem."""

    parallelism = 8  # files in flight at once: object stores reward concurrency

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        retry_secs: float = RETRY_SECS,
        lease_secs: float = LEASE_SECS,
    ) -> None:
        self.url = url.rstrip("/")
        options = _client_options(self.url, storage_options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:  # fsspec names the missing filesystem package
            extra = _EXTRAS.get(self.url.partition("://")[0])
            hint = f" (pip install '{DISTRIBUTION}[{extra}]')" if extra else ""
            raise InvalidOptionError(f"{self.url}: {e}{hint}") from e
        except ValueError as e:  # "Protocol not known"
            raise InvalidOptionError(f"{self.url}: {e}") from e
        if hasattr(self.fs, "retries") and "s3" in _protocols(self.fs):
            self.fs.retries = 2  # s3fs's own loop (5, sleeping); `retry` is the policy
        self.root = root.rstrip("/")
        self.retry_secs = retry_secs
        self._lease_secs = lease_secs
        self._lease: WriterLease | None = None
        self._answered = False  # has any request got an answer?
        self._contact_lock = threading.Lock()

    def _path(self, path: str) -> str:
        return f"{self.root}/{path}"

    # ----------------------------------------------------------------- retries

    def retry(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient failures; failures come out typed."""
        self._first_contact()
        try:
            return retrying(self.retry_secs)(fn)
        except (FileNotFoundError, FileExistsError, CheckpointError):
            raise  # a missing object is an answer; ours are typed already
        except Exception as e:
            raise self._typed(e, self.retry_secs) from e

    def _first_contact(self) -> None:
        """Get one answer from the store within `FIRST_CONTACT_SECS`, or fail with
        `RemoteUnavailableError` (the clients' own retries would take minutes)."""
        if self._answered:
            return
        with self._contact_lock:
            if self._answered:
                return
            outcome: list[BaseException | None] = []
            bucket = self.root.split("/")[0] if _has_buckets(self.fs) else None

            def reachable() -> bool:
                """Whether the directory exists or, not made yet, its bucket does."""
                return bool(self.fs.exists(self.root)) or bucket is None or bool(
                    self.fs.exists(bucket)
                )

            def probe() -> None:
                try:
                    if retrying(FIRST_CONTACT_SECS)(reachable):
                        outcome.append(None)
                    else:  # else a reader would wait forever on a mistyped bucket
                        outcome.append(
                            RemoteStorageError(
                                f"{self.url}: there is no bucket {bucket!r}. Check the URL "
                                f"and the credentials"
                            )
                        )
                except BaseException as e:
                    outcome.append(e)

            thread = threading.Thread(target=probe, name="checkpointing-contact", daemon=True)
            thread.start()
            thread.join(FIRST_CONTACT_SECS + 1)
            if not outcome:
                raise RemoteUnavailableError(
                    f"no answer from {self.url} within {FIRST_CONTACT_SECS:g} s. Check the "
                    f"URL, the endpoint in storage_options and the network"
                )
            error = outcome[0]
            if isinstance(error, CheckpointError):
                raise error
            if error is not None and not isinstance(error, FileNotFoundError):
                raise self._typed(error, FIRST_CONTACT_SECS) from error
            self._answered = True

    def _typed(self, error: BaseException, secs: float) -> CheckpointError:
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        said = f"{type(error).__name__}: {message}" if message else type(error).__name__
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return DiskFullError(
                error.errno, f"{self.url}: the local copy ran out of space. Free space"
            )
        if is_transient(error):
            return RemoteUnavailableError(
                f"{self.url} kept failing for {secs:g} s ({said}). Nothing committed was "
                f"lost; check the network and the store, then retry"
            )
        return RemoteStorageError(
            f"{self.url}: the store refused the request ({said}). Check the URL, the "
            f"credentials and storage_options"
        )

    # ----------------------------------------------------------------- listing

    def committed(self, record_name: str) -> dict[str, str]:
        found = self.retry(lambda: self.fs.glob(f"{self.root}/*/{record_name}", detail=True))
        return {
            path.rstrip("/").split("/")[-2]: _version(info) for path, info in sorted(found.items())
        }

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.retry(lambda: self.fs.ls(self._path(path), detail=False))
        except FileNotFoundError:
            return []
        return [e.rstrip("/").split("/")[-1] for e in entries]

    def exists(self, path: str) -> bool:
        return bool(self.retry(lambda: self.fs.exists(self._path(path))))

    def size(self, path: str) -> int:
        return int(self.retry(lambda: self.fs.size(self._path(path))))

    # ----------------------------------------------------------------- reading

    def open_read(self, path: str) -> BinaryIO:
        return self.retry(lambda: self.fs.open(self._path(path), "rb", block_size=BLOCK_SIZE))  # type: ignore[no-any-return]

    def read_bytes(self, path: str, limit: int) -> bytes:
        data: bytes = self.retry(lambda: self.fs.cat_file(self._path(path), start=0, end=limit + 1))
        if len(data) > limit:
            raise too_large(f"{self.url}/{path}", limit)
        return data

    def download(self, path: str, local_path: str) -> None:
        """Copy a file to local disk as it is (unchecked: for layouts without a record)."""
        self.retry(lambda: self.fs.get_file(self._path(path), local_path))

    # ----------------------------------------------------------------- writing

    def begin(self, name: str, token: str) -> StepWriter:
        del token  # files go straight to their place; the record alone makes them visible
        return _RemoteStepWriter(self, name)

    def write_bytes(self, path: str, data: bytes, *, parents: bool = False) -> None:
        del parents  # object stores have no folders
        self.retry(lambda: self.fs.pipe_file(self._path(path), data))

    def create_bytes(self, path: str, data: bytes) -> None:
        """Write a small object only if none exists (`FileExistsError` otherwise): S3's
        ``If-None-Match: *``, GCS's ``ifGenerationMatch=0``."""
        self.retry(lambda: self.fs.pipe_file(self._path(path), data, mode="create"))

    def remove(self, path: str) -> None:
        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(path))

        self.retry(attempt)

    def delete(self, name: str, record_name: str) -> None:
        self.check_lease()
        self.retry(lambda: self.fs.rm_file(self._path(f"{name}/{record_name}")))
        self.remove_tree(self._path(name))

    def remove_tree(self, path: str) -> None:
        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

        self.retry(attempt)

    def cleanup(self, is_step: Callable[[str], bool], record_name: str) -> list[str]:
        self.check_lease()  # only the lease holder may judge what is a leftover
        names = self.listdir("")
        committed = set(self.committed(record_name))
        leftovers = [n for n in names if is_step(n) and n not in committed]
        for name in leftovers:
            self.remove_tree(self._path(name))
        return leftovers

    # ------------------------------------------------------------ writer lease

    def lock(self) -> None:
        """Take the directory's writer lease (`lease.WriterLease`)."""
        quick = copy.copy(self)  # a renewal that fails is retried by the next, not here
        quick.retry_secs = self._lease_secs / 3
        lease = WriterLease(quick, self._lease_secs)
        lease.acquire()
        self._lease = lease

    def unlock(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def check_lease(self) -> None:
        """Raise `DirectoryLockedError` if this writer lost its lease (no-op for
        readers, which hold none)."""
        if self._lease is not None:
            self._lease.check()


def _version(info: dict[str, Any]) -> str:
    """A token that changes when an object is replaced: the store's ETag or generation
    where it gives one, else the time it was written, and the size."""
    for key in ("generation", "ETag", "etag", "LastModified", "mtime", "created"):
        if info.get(key):
            return f"{info[key]}-{info.get('size')}"
    return f"?-{info.get('size')}"


def _has_buckets(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether the first part of a path on ``fs`` names a bucket (S3, GCS)."""
    return bool({"s3", "s3a", "gs", "gcs"} & set(_protocols(fs)))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _client_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The user's options, with fresh listings forced and, for S3, bounded client
    retries and connect time-outs unless set (`retry` owns the retry policy)."""
    options = {**options, "use_listings_cache": False, "skip_instance_cache": True}
    if url.startswith(("s3://", "s3a://")):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", 10)
        config.setdefault("retries", {"total_max_attempts": 3, "mode": "standard"})
        options["config_kwargs"] = config
    return options
