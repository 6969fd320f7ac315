"""Typed errors. Every message says what happened and what to do about it."""

from __future__ import annotations


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


class DirectoryLockedError(CheckpointError):
    """Another manager is writing to the same directory."""


class ReadOnlyError(CheckpointError):
    """A write was attempted through a read-only manager."""


class DiskFullError(CheckpointError, OSError):
    """The storage ran out of space; the save was rolled back, older steps are intact."""


class CoordinationError(CheckpointError):
    """The processes of a distributed job did not meet in time: one died, hung, or did
    not make the same manager calls as the others."""
