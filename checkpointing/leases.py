"""Reader leases: evaluation jobs keep the training job's retention away from a step.

A reader lease is a small file ``.leases/<step>.<id>.json`` holding its expiry time. While
it lives, the training job's retention leaves that step alone and deletes it at a later
save, once the lease is released or has expired. A holder renews its lease from a
thread, so a reader that crashed pins a step for one time-to-live at most. Expiry uses
wall-clock time, so the machines' clocks must roughly agree (within the TTL).

Taking a lease and deleting a step race: a reader may lease a step right after the
trainer read the leases. Both sides therefore announce first and look second: the reader
writes its lease, then checks for a deletion mark ``.leases/<step>.deleting.json``; the
trainer writes that mark, then reads the leases again. Whichever looks second sees the
other's file, so a step is never deleted under a reader that was told it is present.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator

from checkpointing.errors import CheckpointError, RemoteStorageError
from checkpointing.format import schema
from checkpointing.storage import Storage

logger = logging.getLogger("checkpointing")
LEASE_DIR = ".leases"
LEASE_TTL_SECS = 120.0
MAX_LEASE_SECS = 86400.0  # the longest a lease may pin a step without being renewed


@contextlib.contextmanager
def lease(storage: Storage, step: int, ttl: float = LEASE_TTL_SECS) -> Iterator[None]:
    """Hold a reader lease on ``step`` for the duration of the block."""
    path = f"{LEASE_DIR}/{step}.{uuid.uuid4().hex}.json"
    stop = threading.Event()

    def write() -> None:
        storage.write_bytes(path, _body(step, time.time() + ttl), parents=True)

    def renew() -> None:
        while not stop.wait(ttl / 3):
            with contextlib.suppress(Exception):  # the next renewal tries again
                write()

    write()
    renewer = threading.Thread(target=renew, name=f"checkpointing-lease-{step}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        storage.remove(path)


# `<step>.<32 hex>.json`: a reader's lease; `<step>.deleting.json`: a trainer's mark.
# Other names in the folder are not ours and are left alone.
_LEASE_NAME = re.compile(r"([0-9]+)\.(?:[0-9a-f]{32}|(deleting))\.json")
_MAX_LEASE_BYTES = 4096


def leased_steps(storage: Storage, now: float) -> set[int]:
    """Steps under a live lease. Expired leases and marks are removed on the way, and so
    are files of those names that are not leases (leases are written atomically, so
    such a file was never one)."""
    steps = set()
    for name in storage.listdir(LEASE_DIR):
        found = _LEASE_NAME.fullmatch(name)
        if found is None:
            continue
        path = f"{LEASE_DIR}/{name}"
        expires_at = _expiry(storage, path, int(found.group(1)), now)
        if expires_at is None or expires_at <= now:
            with contextlib.suppress(OSError, CheckpointError):  # a folder, a read-only
                storage.remove(path)  # mount, a link: leave it
        elif not found.group(2):
            steps.add(int(found.group(1)))
    return steps


def _body(step: int, expires_at: float) -> bytes:
    return json.dumps({"step": step, "expires_at": expires_at}).encode()


def _expiry(storage: Storage, path: str, step: int, now: float) -> float | None:
    """When the lease or mark at ``path`` expires; None if it is gone or not one (a
    lease expiring more than `MAX_LEASE_SECS` from ``now`` is not one: it would pin its
    step for longer than any reader could need)."""
    try:
        body = schema.loads(storage.read_bytes(path, _MAX_LEASE_BYTES), path)
    except RemoteStorageError:
        raise  # unknown is not expired: never delete a step on a network error
    except (OSError, CheckpointError):  # gone, unreadable, a link, a socket, junk
        return None
    if not isinstance(body, dict) or body.get("step") != step:
        return None
    expires_at = body.get("expires_at")
    if not isinstance(expires_at, float | int) or isinstance(expires_at, bool):
        return None
    return float(expires_at) if expires_at <= now + MAX_LEASE_SECS else None


@contextlib.contextmanager
def deleting(storage: Storage, step: int, ttl: float = LEASE_TTL_SECS) -> Iterator[bool]:
    """Mark ``step`` as being deleted during the block; yields whether it may go (False
    when a reader leased it meanwhile). A crashed deleter's mark expires after ``ttl``."""
    path = f"{LEASE_DIR}/{step}.deleting.json"
    try:
        storage.write_bytes(path, _body(step, time.time() + ttl), parents=True)
    except (OSError, CheckpointError) as e:  # e.g. a folder of that name: keep the step
        logger.warning("step %d kept: cannot mark it as being deleted (%s)", step, e)
        yield False
        return
    try:
        yield step not in leased_steps(storage, time.time())
    finally:
        with contextlib.suppress(OSError):
            storage.remove(path)


def being_deleted(storage: Storage, step: int, now: float) -> bool:
    """Whether a trainer is deleting ``step`` (call it with a lease held)."""
    expires_at = _expiry(storage, f"{LEASE_DIR}/{step}.deleting.json", step, now)
    return expires_at is not None and expires_at > now
