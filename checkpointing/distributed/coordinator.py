"""`TorchDistributed`: the coordinator of a torch.distributed job (torchrun, accelerate).

It works through gloo groups of its own, created from the default process group when
the manager is built: gloo runs on CPU whatever the training backend is (NCCL included),
our collectives get a timeout of their own instead of the job's (often 30 minutes), and
the background save thread gets a separate group, so its collectives never interleave
with the training thread's.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from checkpointing.coordination import Coordinator, SingleProcess
from checkpointing.errors import CoordinationError, InvalidOptionError

T = TypeVar("T")


class TorchDistributed:
    """Coordinates the processes of the default process group through gloo.

    Building it is a collective call: every process builds one, in the same order as
    its other collectives (the manager does this in its constructor).
    """

    def __init__(self, *, timeout_secs: float = 600.0, primary: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidOptionError(
                "TorchDistributed needs an initialized process group: call "
                "torch.distributed.init_process_group() first (torchrun sets up the rest)"
            )
        if not 0 <= primary < dist.get_world_size():
            raise InvalidOptionError(
                f"primary must be a rank of the job (0 to {dist.get_world_size() - 1}), "
                f"got {primary}"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.primary = primary
        self.timeout_secs = timeout_secs
        timeout = datetime.timedelta(seconds=timeout_secs)
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self._background = _Channel(self, dist.new_group(backend="gloo", timeout=timeout))

    @property
    def is_primary(self) -> bool:
        return self.rank == self.primary

    def barrier(self, name: str) -> None:
        _barrier(self, self.group, name)

    def broadcast(self, value: T) -> T:
        return _broadcast(self, self.group, value)

    def all_gather(self, value: T) -> list[T]:
        return _all_gather(self, self.group, value)

    def background(self) -> Coordinator:
        return self._background


class _Channel:
    """The same processes as a `TorchDistributed`, over another group."""

    def __init__(self, parent: TorchDistributed, group: Any) -> None:
        self.rank, self.world_size, self.group = parent.rank, parent.world_size, group
        self.primary, self.timeout_secs = parent.primary, parent.timeout_secs
        self._parent = parent

    @property
    def is_primary(self) -> bool:
        return self.rank == self.primary

    def barrier(self, name: str) -> None:
        _barrier(self, self.group, name)

    def broadcast(self, value: T) -> T:
        return _broadcast(self, self.group, value)

    def all_gather(self, value: T) -> list[T]:
        return _all_gather(self, self.group, value)

    def background(self) -> Coordinator:
        return self


def default_coordinator(timeout_secs: float) -> Coordinator:
    """`TorchDistributed` in a job of several processes, else `SingleProcess`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed(timeout_secs=timeout_secs)
    return SingleProcess()


def _barrier(c: TorchDistributed | _Channel, group: Any, name: str) -> None:
    # monitored_barrier (gloo only) names the ranks that did not arrive.
    _collective(
        c,
        f"barrier {name!r}",
        lambda: dist.monitored_barrier(
            group, timeout=datetime.timedelta(seconds=c.timeout_secs), wait_all_ranks=True
        ),
    )


def _broadcast(c: TorchDistributed | _Channel, group: Any, value: T) -> T:
    box = [value]
    _collective(
        c, "broadcast", lambda: dist.broadcast_object_list(box, src=c.primary, group=group)
    )
    return box[0]


def _all_gather(c: TorchDistributed | _Channel, group: Any, value: T) -> list[T]:
    out: list[Any] = [None] * c.world_size
    _collective(c, "all_gather", lambda: dist.all_gather_object(out, value, group=group))
    return out


def _collective(c: TorchDistributed | _Channel, what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except (RuntimeError, OSError) as e:  # DistBackendError is a RuntimeError
        raise CoordinationError(
            f"rank {c.rank}: {what} across {c.world_size} processes failed or timed out "
            f"(timeout {c.timeout_secs:g} s): {e}. Another rank probably died, hangs, or "
            f"did not make the same checkpoint manager calls (save, restore, delete, "
            f"reload are collective)."
        ) from e
