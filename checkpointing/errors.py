"""Typed errors. Every message says what happened and what to do about it."""

from __future__ import annotations

import errno


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidOptionError(CheckpointError, ValueError):
    """An option or argument has a value that cannot work."""


class UnsupportedTypeError(CheckpointError, TypeError):
    """A leaf of the state cannot be stored without pickle."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory holds no committed checkpoint (or not the one asked for)."""


class ItemNotFoundError(CheckpointError, KeyError):
    """A requested item is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StepAlreadyExistsError(CheckpointError):
    """A committed checkpoint for this step already exists; it is never overwritten."""


class StepOrderError(CheckpointError):
    """The step is lower than the latest committed step."""


class CorruptCheckpointError(CheckpointError):
    """A file is missing, has the wrong size, or fails its checksum."""


class UnsupportedFormatError(CheckpointError):
    """The checkpoint was written in a format this version of the library cannot read:
    a newer one (upgrade), or a retired one (the message says how to convert it)."""


class PartialRestoreError(CorruptCheckpointError):
    """Corruption was found after part of the step was already read into the target: the
    target holds a mix of old and restored values. Restore another step into it (or use
    ``all_or_nothing=True``, which changes the target only once everything checked out)."""


class TargetMismatchError(CheckpointError, ValueError):
    """The restore target does not fit the checkpoint (other keys, shapes or parameter
    groups); it was left unchanged."""


class DirectoryLockedError(CheckpointError):
    """Another manager is writing to the same directory (or, on an object store, took
    over this manager's writer lease after it went unrenewed)."""


class RemoteStorageError(CheckpointError, OSError):
    """An object store refused or failed a request for good: access denied, no such
    bucket, a bad request. The message names the URL and the store's own words."""


class RemoteUnavailableError(RemoteStorageError):
    """An object store could not be reached, or kept failing, for longer than the retry
    budget. Nothing committed was lost; retry when the network or the store is back."""


class RemoteBehindError(CheckpointError):
    """A mirror's remote copy lacks committed steps (the local ones are safe); the
    message says which and the last remote error. Uploads keep retrying in the
    background and resume when the manager is opened again."""


class ReadOnlyError(CheckpointError):
    """A write was attempted through a read-only manager."""


class DiskFullError(CheckpointError, OSError):
    """The storage ran out of space; the save was rolled back, older steps are intact."""


class CoordinationError(CheckpointError):
    """The processes of a distributed job did not meet in time: one died, hung, or did
    not make the same manager calls as the others."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # out of blocks, inodes, quota


def raise_if_disk_full(error: BaseException, message: str) -> None:
    """Raise `DiskFullError` (``message``, then what to do) from ``error`` when it is a
    full disk, out of inodes or over quota; return otherwise."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        raise DiskFullError(
            error.errno, f"{message}: {error.strerror}. Free space, or keep fewer checkpoints."
        ) from error
