"""Replicated state restored once per job: each process reads a share, the rest arrives by
broadcast.

Every process of a data-parallel job restores the same replicated tensors. Read by each
of them, the state crosses the disk (or the shared filesystem) once per process. Here
the large tensors are split into contiguous shares of about equal bytes, one per process;
each process reads and verifies its share, broadcasting each tensor as soon as it has it
(the broadcasts overlap the reads), and then the processes agree that every share
checked out: damage found by one fails the restore on all, as a damaged file does in a
single process (`PartialRestoreError` where a target was already written). Tensors below
`SHARED_MIN_BYTES` are read by every process: a broadcast each would cost more than
their bytes.

The plan is a function of the commit record alone, which every process reads alike. The
processes compare plans before reading anything, so a job whose processes restore
different items reads everything in each process instead of exchanging mismatched
tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from checkpointing import errors
from checkpointing.coordination import TensorChannel, describe
from checkpointing.errors import CheckpointError, CoordinationError, CorruptCheckpointError
from checkpointing.format import tree
from checkpointing.format.reader import StepReader
from checkpointing.format.tensors import parse_dtype

SHARED_MIN_BYTES = 1 << 20
"""Tensors at least this large are read by one process and broadcast to the others."""

TensorKey = tuple[int, str, str]  # (step, file, key) of a stored tensor


def plan(nodes: Iterable[tree.Node], step: int, world_size: int) -> dict[TensorKey, int]:
    """Which process reads each shared tensor of ``nodes`` (of ``step``'s record):
    contiguous runs, in the order the record lists them, of about ``1 / world_size`` of
    their bytes each."""
    sizes: dict[TensorKey, int] = {}
    other: set[TensorKey] = set()  # also read as views, arrays, shards: by everyone
    for node in nodes:
        for tag, body, _ in tree.walk(node):
            nbytes = _nbytes(tag, body)
            if nbytes >= SHARED_MIN_BYTES:
                sizes.setdefault(_key(body, step), nbytes)
            elif not nbytes:
                bodies = body["chunks"] if tag == "dtensor" and "chunks" in body else [body]
                other.update(_key(b, step) for b in bodies if "key" in b)
    sizes = {key: n for key, n in sizes.items() if key not in other}
    total = sum(sizes.values())
    owners, start = {}, 0
    for key, nbytes in sizes.items():
        owners[key] = min(world_size - 1, (start + nbytes // 2) * world_size // total)
        start += nbytes
    return owners


class SharedReads:
    """The reads of one restore, its shared tensors read by their owner alone.

    Every process calls `agree`, then `read` for the same array nodes in the same order,
    then `settle`: the last two stand in for the reader's own ``read`` and ``settle``.
    Broadcasts overlap the reads: a tensor is sent as soon as its owner has it verified,
    while the owner's later tensors are still arriving from the disk.
    """

    def __init__(
        self, channel: TensorChannel, reader: StepReader, step: int, nodes: Iterable[tree.Node]
    ) -> None:
        self._channel = channel
        self._reader = reader
        self._step = step
        self._owners = plan(nodes, step, channel.world_size)
        self._buffers: dict[TensorKey, torch.Tensor] = {}
        # (buffer, owner, set once the owner's bytes are in and verified), to broadcast
        self._pending: list[tuple[torch.Tensor, int, threading.Event]] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, buffer)
        self.touched = False  # whether a broadcast or copy went into a caller's tensor
        self._error: Exception | None = None  # of a read of this process's own

    def agree(self, check: Callable[[], None]) -> None:
        """Run ``check`` (what is checked before reading) on every process; raise what
        failed on any; read everything here if the processes planned differently."""
        error = _run(check)
        fingerprint = hashlib.sha256(repr(sorted(self._owners.items())).encode()).hexdigest()
        gathered = self._channel.all_gather((describe(error), fingerprint))
        _raise_first(error, [e for e, _ in gathered], "before reading")
        if len({f for _, f in gathered}) > 1:
            self._owners = {}

    def shares(self, tag: str, body: dict[str, Any]) -> bool:
        """Whether an array node is read by one process for all (through `read`)."""
        return tag == "tensor" and _key(body, self._step) in self._owners

    def alone(self, read: Callable[[], Any]) -> Any:
        """What ``read`` returns: a read by this process of its own. Its error waits for
        `settle` (None stands in for the value): raised at once, it would leave the other
        processes waiting on broadcasts."""
        if self._error is None:
            try:
                return read()
            except Exception as e:
                self._error = e
        return None

    def read(self, body: dict[str, Any], dest: torch.Tensor | None) -> torch.Tensor:
        """The value of a shared "tensor" node, read into ``dest`` where it fits (as
        `StepReader.read`); its bytes are in after `settle`."""
        key = _key(body, self._step)
        owner = self._owners[key]
        dtype, shape = parse_dtype(body["dtype"]), tuple(body["shape"])
        fits = dest is not None and (dest.dtype, tuple(dest.shape)) == (dtype, shape)
        into = dest if fits and dest is not None and _in_place(dest) else None
        buffer = self._buffers.get(key)
        if buffer is None:
            ready = threading.Event()
            if owner == self._channel.rank:
                buffer = self.alone(lambda: self._reader.read("tensor", body, into, ready.set))
                if buffer is None:  # what it sends does not count: settle raises
                    buffer = torch.empty(shape, dtype=dtype)
                    ready.set()
            else:  # checked before reading, like every node
                buffer = into if into is not None else torch.empty(shape, dtype=dtype)
                self.touched |= into is not None
            self._buffers[key] = buffer
            self._pending.append((buffer, owner, ready))
        elif (buffer.dtype, tuple(buffer.shape)) != (dtype, shape):  # a crafted record
            raise CorruptCheckpointError(
                f"step {self._step}: tensor {body['key']!r} of {body['file']} is read both as "
                f"{buffer.dtype}{list(buffer.shape)} and as {dtype}{list(shape)}"
            )
        if fits and dest is not None and buffer is not dest:
            self._copies.append((dest, buffer))  # on another device, or a second place
            return dest
        return buffer

    def settle(self) -> None:
        """Broadcast each shared tensor from its owner once the owner has it (what failed
        to read is sent all the same, so that the broadcasts stay matched); then, once
        every process's reads checked out, fill the destinations that could not be read
        into directly. Damage found by any process fails this restore on all of them."""
        pending, self._pending = self._pending, []
        rank, world = self._channel.rank, self._channel.world_size
        # Owners take turns, so that every process sends while the others do.
        shares = [[p for p in pending if p[1] == r] for r in range(world)]
        turns = [p for turn in itertools.zip_longest(*shares) for p in turn if p is not None]

        def when_read() -> Iterator[tuple[torch.Tensor, int]]:
            for buffer, owner, ready in turns:
                if owner == rank and self._error is None:  # else it may never be
                    self._reader.wait(ready)
                yield buffer.detach().reshape(-1).view(torch.uint8), owner

        self._channel.broadcast_tensors(when_read())
        error = self._error or _run(self._reader.settle)
        _raise_first(error, self._channel.all_gather(describe(error)), "reading its share")
        copies, self._copies = self._copies, []
        self.touched |= bool(copies)
        with torch.no_grad():
            for dest, buffer in copies:
                dest.copy_(buffer)


def _key(body: dict[str, Any], step: int) -> TensorKey:
    """Which stored tensor a node reads: of ``step``, or of the step it refers to."""
    return body.get("step", step), body["file"], body["key"]


def _in_place(dest: torch.Tensor) -> bool:
    """Whether a tensor of the right shape and dtype can be read and broadcast into as it
    is (a contiguous CPU tensor)."""
    return dest.device.type == "cpu" and dest.is_contiguous()


def _nbytes(tag: str, body: dict[str, Any]) -> int:
    """The bytes of a plain tensor node; 0 for others (views, arrays, shards)."""
    if tag != "tensor" or "stride" in body:
        return 0
    return int(math.prod(body["shape"])) * parse_dtype(body["dtype"]).itemsize


def _run(call: Callable[[], None]) -> Exception | None:
    try:
        call()
    except Exception as e:  # told to the other processes, then raised
        return e
    return None


def _raise_first(mine: Exception | None, described: list[str | None], doing: str) -> None:
    """Raise this process's error, else the first other process's as the same
    `CheckpointError` subclass (`CoordinationError` for other errors)."""
    if mine is not None:
        raise mine
    for rank, text in enumerate(described):
        if text is None:
            continue
        name, _, message = text.partition(": ")
        kind = getattr(errors, name, None)
        if not (isinstance(kind, type) and issubclass(kind, CheckpointError)):
            kind = CoordinationError
        raise kind(f"rank {rank} failed this restore {doing}: {message}")
