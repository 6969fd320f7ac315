"""`TorchDistributed`: the coordinator of a torch.distributed job (torchrun, accelerate).

It works through gloo groups of its own, created from the default process group when
the manager is built: gloo runs on CPU whatever the training backend is (NCCL included),
our collectives get a timeout of their own instead of the job's (often 30 minutes), and
the background save thread gets a separate group, so its collectives never interleave
with the training thread's.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from checkpointing.coordination import Coordinator, SingleProcess
from checkpointing.errors import CoordinationError, InvalidOptionError

T = TypeVar("T")


class _Channel:
    """Collectives among the processes of a job, over one gloo group."""

    def __init__(
        self, rank: int, world_size: int, primary: int, timeout_secs: float, group: Any
    ) -> None:
        self.rank, self.world_size, self.primary = rank, world_size, primary
        self.timeout_secs, self.group = timeout_secs, group

    @property
    def is_primary(self) -> bool:
        """Whether this process is the ``primary`` one."""
        return self.rank == self.primary

    def barrier(self, name: str) -> None:
        """A monitored gloo barrier (see `Coordinator.barrier`)."""
        # monitored_barrier (gloo only) names the ranks that did not arrive.
        timeout = datetime.timedelta(seconds=self.timeout_secs)
        self._collective(
            f"barrier {name!r}",
            lambda: dist.monitored_barrier(self.group, timeout=timeout, wait_all_ranks=True),
        )

    def broadcast(self, value: T) -> T:
        """The primary's picklable ``value`` (see `Coordinator.broadcast`)."""
        box = [value]
        self._collective(
            "broadcast",
            lambda: dist.broadcast_object_list(box, src=self.primary, group=self.group),
        )
        return box[0]

    def all_gather(self, value: T) -> list[T]:
        """Every process's picklable ``value`` (see `Coordinator.all_gather`)."""
        out: list[Any] = [None] * self.world_size
        self._collective("all_gather", lambda: dist.all_gather_object(out, value, self.group))
        return out

    def broadcast_tensors(self, tensors: Iterable[tuple[torch.Tensor, int]]) -> None:
        """Each tensor from its source rank (see `TensorChannel.broadcast_tensors`); CPU
        tensors, each in flight from when it is yielded."""

        def run() -> None:
            works = [
                dist.broadcast(t, src=src, group=self.group, async_op=True) for t, src in tensors
            ]
            for work in works:
                work.wait()

        self._collective("broadcast of tensors", run)

    def background(self) -> Coordinator:
        """This channel itself (see `Coordinator.background`)."""
        return self

    def _collective(self, what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except (RuntimeError, OSError) as e:  # DistBackendError is a RuntimeError
            raise CoordinationError(
                f"rank {self.rank}: {what} across {self.world_size} processes failed or "
                f"timed out (timeout {self.timeout_secs:g} s): {e}. Another rank probably "
                f"died, hangs, or did not make the same checkpoint manager calls (save, "
                f"restore, delete, reload are collective)."
            ) from e


class TorchDistributed(_Channel):
    """Coordinates the processes of the default process group through gloo.

    Building it is a collective call: every process builds one, in the same order as
    its other collectives (the manager does this in its constructor).

    Args:
        timeout_secs: How long a collective waits for the other processes before
            raising `CoordinationError` (instead of the job's timeout, often 30 minutes).
        primary: The rank that writes commit records and applies retention.

    Raises:
        InvalidOptionError: No process group is initialized, or ``primary`` is not a
            rank of the job.
    """

    def __init__(self, *, timeout_secs: float = 600.0, primary: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidOptionError(
                "TorchDistributed needs an initialized process group: call "
                "torch.distributed.init_process_group() first (torchrun sets up the rest)"
            )
        world_size = dist.get_world_size()
        if not 0 <= primary < world_size:
            raise InvalidOptionError(
                f"primary must be a rank of the job (0 to {world_size - 1}), got {primary}"
            )
        timeout = datetime.timedelta(seconds=timeout_secs)
        rank = dist.get_rank()
        group = dist.new_group(backend="gloo", timeout=timeout)
        super().__init__(rank, world_size, primary, timeout_secs, group)
        background = dist.new_group(backend="gloo", timeout=timeout)
        self._background = _Channel(rank, world_size, primary, timeout_secs, background)

    def background(self) -> Coordinator:
        """A coordinator over a gloo group of its own (see `Coordinator.background`)."""
        return self._background


def default_coordinator(timeout_secs: float) -> Coordinator:
    """`TorchDistributed` in a job of several processes, else `SingleProcess`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed(timeout_secs=timeout_secs)
    return SingleProcess()
