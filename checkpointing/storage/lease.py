"""The writer lease of an object store: one writer per directory, with no lock server.

A local directory has `flock`, which the kernel releases when its holder dies. An object
store has only conditional writes, so the writer holds a lease instead: an object
``.lock/<epoch>.json`` with its owner and an expiry time, created with a conditional
create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) that exactly one of two
racing writers wins. The holder rewrites its object every third of the time-to-live.

Epochs only grow: a newcomer that finds the newest lease expired (its holder died, or
released it) creates the next epoch, and the lowest epochs are removed. A holder that
sees a higher epoch than its own has lost the lease (it went unrenewed past its expiry,
e.g. the network was down and another writer took over) and stops writing: `check`,
called before every commit and delete, raises `DirectoryLockedError`. The holder trusts
its lease only while its last renewal is younger than half the time-to-live, which leaves
the other half for clock differences between machines (expiry uses wall-clock time).

A newcomer that finds a live lease waits while it goes unrenewed: a holder that renews
is alive (`DirectoryLockedError` at once); one that lets it expire was dead (taken
over). So a job restarted after a preemption waits out its dead predecessor's lease
instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from checkpointing.errors import CheckpointError, DirectoryLockedError, RemoteStorageError
from checkpointing.format import schema

logger = logging.getLogger("checkpointing")

LOCK_DIR = ".lock"
_NAME = re.compile(r"([0-9]{1,30})\.json")
_MAX_BODY_BYTES = 4096
_CREATE_TRIES = 8  # epochs lost to other newcomers before giving up
MAX_LEASE_SECS = 86400.0  # a lease claiming longer is junk, not a writer


class LeaseStore(Protocol):
    """What a lease needs of its storage (`storage.remote.FsspecStorage`)."""

    url: str

    def listdir(self, path: str) -> list[str]: ...
    def read_bytes(self, path: str, limit: int) -> bytes: ...
    def write_bytes(self, path: str, data: bytes, *, parents: bool = False) -> None: ...
    def create_bytes(self, path: str, data: bytes) -> None: ...
    def remove(self, path: str) -> None: ...


class WriterLease:
    """The lease of one writer on one directory; `acquire`, `check`, `release`."""

    def __init__(
        self,
        store: LeaseStore,
        ttl: float,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._store = store
        self.ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self.owner = uuid.uuid4().hex
        self.epoch: int | None = None
        self.lost = False
        self._renewed = 0.0  # time.monotonic() when the last successful renewal began
        self._lock = threading.Lock()  # one renewal at a time (the thread, `check`)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---------------------------------------------------------------- acquire

    def acquire(self) -> None:
        """Take the lease, waiting out a holder that does not renew; raise
        `DirectoryLockedError` as soon as the holder is seen renewing."""
        first_seen: tuple[int, float] | None = None
        for _ in range(_CREATE_TRIES):
            while True:
                epoch, holder = self._newest()
                now = self._clock()
                if holder is None or holder["expires_at"] <= now:
                    break
                if holder["expires_at"] > now + MAX_LEASE_SECS:
                    logger.warning(
                        "ignoring the writer lease of %s: it claims a day", self._store.url
                    )
                    break
                seen = (epoch, holder["expires_at"])
                if first_seen is not None and seen != first_seen:
                    raise self._locked(holder, now)
                first_seen = seen
                self._sleep(min(holder["expires_at"] - now, self.ttl / 6) + 0.05)
            mine = epoch + 1
            began = time.monotonic()
            try:
                self._write(mine, create=True)
            except FileExistsError:  # another newcomer took this epoch first
                continue
            except FileNotFoundError as e:
                raise RemoteStorageError(
                    f"cannot write to {self._store.url}: {e}. Does the bucket exist?"
                ) from e
            self.epoch, self._renewed = mine, began
            self._remove_below(mine)
            self._renewer = threading.Thread(
                target=self._renew_loop, name="checkpointing-writer-lease", daemon=True
            )
            self._renewer.start()
            return
        raise DirectoryLockedError(
            f"other writers keep taking the writer lease of {self._store.url}; only one "
            f"writer per directory is allowed"
        )

    def _newest(self) -> tuple[int, dict[str, Any] | None]:
        """The newest epoch (0 if none) and its lease; None if released or unreadable."""
        epochs = self._epochs()
        if not epochs:
            return 0, None
        epoch = max(epochs)
        return epoch, self._read(epoch)

    def _read(self, epoch: int) -> dict[str, Any] | None:
        path = f"{LOCK_DIR}/{epoch}.json"
        where = f"{self._store.url}/{path}"
        try:
            body = schema.loads(self._store.read_bytes(path, _MAX_BODY_BYTES), where)
        except FileNotFoundError:
            return None
        except CheckpointError as e:  # junk: nobody can be renewing it
            logger.warning("ignoring the writer lease %s: %s", where, e)
            return None
        expires_at = body.get("expires_at") if isinstance(body, dict) else None
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            logger.warning("ignoring the writer lease %s: no expiry time", where)
            return None
        holder = "".join(c if c.isprintable() else "?" for c in str(body.get("holder"))[:200])
        return {"expires_at": float(expires_at), "holder": holder}

    def _locked(self, holder: dict[str, Any], now: float) -> DirectoryLockedError:
        return DirectoryLockedError(
            f"another CheckpointManager ({holder['holder']}) is writing to "
            f"{self._store.url}: it holds the writer lease and renews it. Only one writer "
            f"per directory is allowed; open this one with read_only=True to read"
        )

    def _write(self, epoch: int, *, create: bool = False, expires_at: float | None = None) -> None:
        if expires_at is None:
            expires_at = self._clock() + self.ttl
        holder = f"{socket.gethostname()} pid {os.getpid()}"
        body = json.dumps({"owner": self.owner, "holder": holder, "expires_at": expires_at})
        path = f"{LOCK_DIR}/{epoch}.json"
        if create:
            self._store.create_bytes(path, body.encode())
        else:
            self._store.write_bytes(path, body.encode())

    def _remove_below(self, epoch: int) -> None:
        """Remove the older epochs' objects (tidiness only: a failure changes nothing)."""
        try:
            for found_epoch in self._epochs():
                if found_epoch < epoch:
                    self._store.remove(f"{LOCK_DIR}/{found_epoch}.json")
        except Exception as e:
            logger.warning("could not remove old writer leases of %s: %s", self._store.url, e)

    def _epochs(self) -> list[int]:
        return [int(m.group(1)) for n in self._store.listdir(LOCK_DIR) if (m := _NAME.fullmatch(n))]

    # ------------------------------------------------------------ hold, check

    def _renew(self) -> None:
        """Rewrite the lease unless a higher epoch shows it was lost."""
        with self._lock:
            if self.lost or self.epoch is None:
                return
            if max(self._epochs(), default=0) > self.epoch:
                self.lost = True
                logger.error("lost the writer lease of %s to another writer", self._store.url)
                return
            began = time.monotonic()
            self._write(self.epoch)
            self._renewed = began

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except Exception as e:  # the network: the next round tries again
                logger.warning("could not renew the writer lease of %s: %s", self._store.url, e)
            if self.lost:
                return

    def check(self) -> None:
        """Raise `DirectoryLockedError` unless this writer surely still holds the lease
        (renewing now if the last renewal is too old to trust)."""
        if not self.lost and time.monotonic() - self._renewed > self.ttl / 2:
            self._renew()
        if self.lost:
            raise DirectoryLockedError(
                f"this manager lost the writer lease of {self._store.url}: it went "
                f"unrenewed for over {self.ttl:g} s and another writer took it over. Nothing "
                f"more is written here; check which job should own this directory"
            )

    def release(self) -> None:
        """Stop renewing and mark the lease expired, so the next writer need not wait."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._lock:
            fresh = time.monotonic() - self._renewed < self.ttl / 2  # else the store is
            if self.epoch is not None and not self.lost and fresh:  # likely out of reach
                try:
                    self._write(self.epoch, expires_at=0.0)
                except Exception as e:
                    logger.warning(
                        "could not release the writer lease of %s: %s", self._store.url, e
                    )
            self.epoch = None
