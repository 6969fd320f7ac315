"""Bring a committed step from a remote store into a local directory, once per node.

Several processes restoring the same step (the 8 ranks of a node) take a file lock; the
first downloads, the others find the copy done. A download goes to a temporary
directory, every file is checked against the commit record (size and checksum), the
record is written last and the directory renamed into place, so a killed download is
never used and is cleaned up like any other leftover.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import filelock

from checkpointing.background import parallel_map
from checkpointing.errors import CorruptCheckpointError
from checkpointing.format import tensors
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.storage.local import TMP_PREFIX, fsync_dir
from checkpointing.storage.remote import FsspecStorage


def fetch_step(remote: FsspecStorage, name: str, record: Record, local_root: Path) -> Path:
    """The local directory of step ``name``, downloaded from ``remote`` if needed."""
    local_root.mkdir(parents=True, exist_ok=True)
    final = local_root / name
    with filelock.FileLock(local_root / f".{name}.download.lock"):
        if (final / RECORD_NAME).is_file():
            return final
        tmp = local_root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            parallel_map(
                lambda filename: _download(remote, name, filename, record, tmp),
                list(record.files),
                remote.parallelism,
            )
            (tmp / RECORD_NAME).write_bytes(record.to_json())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(local_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _download(remote: FsspecStorage, name: str, filename: str, record: Record, tmp: Path) -> None:
    target = tmp / filename
    target.parent.mkdir(parents=True, exist_ok=True)  # DCP's files, in sharded/
    remote.download(f"{name}/{filename}", str(target))
    info = record.files[filename]
    with open(target, "rb") as f:
        size = f.seek(0, 2)
        if size != info.size or tensors.file_checksums(
            f, str(target), opaque=not info.header_checksum
        ) != (
            info.header_checksum,
            info.checksum,
        ):
            raise CorruptCheckpointError(
                f"{remote.url}/{name}/{filename}: the downloaded copy does not match the "
                f"commit record (size or checksum); the remote file is corrupt"
            )
        os.fsync(f.fileno())
