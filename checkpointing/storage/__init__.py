"""Storage backends. The manager reaches files only through `Storage`."""

from __future__ import annotations

import os
from typing import Any

from checkpointing.storage.base import StepWriter, Storage
from checkpointing.storage.local import LocalStorage
from checkpointing.storage.remote import LEASE_SECS, FsspecStorage


def open_storage(
    directory: str | os.PathLike[str],
    *,
    create: bool,
    storage_options: dict[str, Any] | None,
    lease_secs: float = LEASE_SECS,
) -> Storage:
    """Local disk for paths and ``file://`` URLs, fsspec for every other URL (whose
    writer lock is a lease of ``lease_secs``)."""
    text = os.fspath(directory)
    if "://" in text and not text.startswith("file://"):
        return FsspecStorage(text, storage_options=storage_options, lease_secs=lease_secs)
    return LocalStorage(text.removeprefix("file://"), create=create)


__all__ = ["FsspecStorage", "LocalStorage", "StepWriter", "Storage", "open_storage"]
