"""Bring a committed step from a remote store into a local directory, once per node.

Several processes restoring the same step (the 8 ranks of a node) take a file lock; the
first downloads, the others find the copy done. A download goes to a temporary
directory, every file is checked against the commit record (size and checksum), the
record is written last and the directory renamed into place (`transfer.copy_step` into
a local directory), so a killed download is never used and is cleaned up like any other
leftover.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import filelock

from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.storage.base import Storage
from checkpointing.storage.local import LocalStorage
from checkpointing.storage.transfer import copy_step


def default_cache_dir(url: str) -> Path:
    """Where steps downloaded from ``url`` go: ``$XDG_CACHE_HOME/checkpointing/<hash>``."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "checkpointing" / digest


def fetch_step(
    remote: Storage, name: str, record: Record, local_root: Path
) -> tuple[Path, bool]:
    """The local directory of step ``name``, downloaded from ``remote`` if needed, and
    whether this call downloaded (and so just verified) it."""
    local = LocalStorage(local_root, create=True)
    with filelock.FileLock(local_root / f".{name}.download.lock"):
        if local.exists(f"{name}/{RECORD_NAME}"):
            return local_root / name, False
        copy_step(remote, local, (name, name), record)
    return local_root / name, True
