"""Cross-process decisions go through a `Coordinator`.

Who writes the commit record, who deletes, when everyone has finished writing, and which
step everyone agrees on: a single process decides alone; a torch.distributed job decides
through its process group (`checkpointing.distributed.TorchDistributed`, same interface).

A coordinator's collectives are called by every process in the same order. The manager
calls them from the training thread, and, through `background`, from its background
save thread; the two get separate channels so that they never interleave.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch

T = TypeVar("T")


@runtime_checkable
class Coordinator(Protocol):
    """How the processes of a job agree: pass one as ``CheckpointManager(...,
    coordinator=...)`` where the default (`TorchDistributed` under torch.distributed,
    else `SingleProcess`) does not fit.

    Every process calls the collectives (``barrier``, ``broadcast``, ``all_gather``) in
    the same order. An implementation raises `CoordinationError` from them when the
    other processes do not arrive in time, rather than hang.
    """

    @property
    def rank(self) -> int:
        """This process's index, 0 to ``world_size - 1``."""
        ...

    @property
    def world_size(self) -> int:
        """The number of processes in the job."""
        ...

    @property
    def primary(self) -> int:
        """The rank that writes commit records and applies retention."""
        ...

    @property
    def is_primary(self) -> bool:
        """Whether this process is the ``primary`` one."""
        ...

    def barrier(self, name: str) -> None:
        """Wait until every process reached the barrier called ``name``.

        Args:
            name: What the processes wait for, for error messages.

        Raises:
            CoordinationError: The others did not arrive in time.
        """
        ...

    def broadcast(self, value: T) -> T:
        """The primary's ``value``, on every process.

        Args:
            value: The primary's value to share; the others' are ignored.

        Returns:
            The primary's value.

        Raises:
            CoordinationError: The others did not arrive in time.
        """
        ...

    def all_gather(self, value: T) -> list[T]:
        """Every process's ``value``, on every process.

        Args:
            value: This process's value.

        Returns:
            The values of all processes, in rank order.

        Raises:
            CoordinationError: The others did not arrive in time.
        """
        ...

    def background(self) -> Coordinator:
        """A coordinator of the same processes for the background save thread.

        Returns:
            One whose collectives never interleave with this one's (a coordinator of a
            single process may return itself).
        """
        ...


@runtime_checkable
class TensorChannel(Coordinator, Protocol):
    """A coordinator that also broadcasts tensors: with one, the processes of a job
    restore replicated state reading it once between them (`distributed.replicated`).
    `TorchDistributed` is one."""

    def broadcast_tensors(self, tensors: Iterable[tuple[torch.Tensor, int]]) -> None:
        """Broadcast each tensor from the rank paired with it, in place, on every process.

        Args:
            tensors: (tensor, source rank) pairs, the same on every process (each
                process's own tensors of the same shapes and dtypes). Taken one at a
                time: a source's tensor may be ready only when the iterator yields it,
                and the earlier ones may be on their way meanwhile.

        Raises:
            CoordinationError: The others did not arrive in time.
        """
        ...


class SingleProcess:
    """The coordinator of a job with one process."""

    rank = 0
    world_size = 1
    primary = 0
    is_primary = True

    def barrier(self, name: str) -> None:
        """Return at once (see `Coordinator.barrier`)."""

    def broadcast(self, value: T) -> T:
        """``value`` itself (see `Coordinator.broadcast`)."""
        return value

    def all_gather(self, value: T) -> list[T]:
        """``[value]`` (see `Coordinator.all_gather`)."""
        return [value]

    def background(self) -> SingleProcess:
        """This coordinator itself (see `Coordinator.background`)."""
        return self


@dataclasses.dataclass(frozen=True)
class PerRank(Generic[T]):
    """Marks an item of the state as each process's own (its RNG, its data position):
    every rank saves and restores its own value, instead of the primary's alone.

    >>> mgr.save(step, {"model": model, "rng": PerRank(rng_states())})

    Attributes:
        value: This process's value: anything a state item may be.
    """

    value: T


def describe(error: BaseException | None) -> str | None:
    """An error as text that crosses processes (to tell the others why one failed)."""
    return None if error is None else f"{type(error).__name__}: {error}"
