"""Cross-process decisions go through a `Coordinator`.

Who writes the commit record, who deletes, when everyone has finished writing, and which
step everyone agrees on: a single process decides alone; a torch.distributed job decides
through its process group (same interface).
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Coordinator(Protocol):
    @property
    def is_primary(self) -> bool:
        """This process writes commit records and applies retention."""
        ...

    def barrier(self, name: str) -> None:
        """Wait until every process reached the barrier called ``name``."""
        ...

    def broadcast(self, value: T) -> T:
        """The primary's ``value``, on every process."""
        ...


class SingleProcess:
    """The coordinator of a job with one process."""

    is_primary = True

    def barrier(self, name: str) -> None:
        pass

    def broadcast(self, value: T) -> T:
        return value
