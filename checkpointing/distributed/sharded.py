"""Sharded tensors (DTensor: FSDP2, tensor parallel), written and read like any other.

Each process writes the shards it holds into a safetensors file of its own,
``sharded/rank<r>.safetensors``, through the same writer as every other file (direct
I/O, checksummed as written). A replica is written once, by the process at coordinate 0
of every mesh dimension that replicates it. The commit record describes the global
layout: each DTensor's ``dtensor`` node holds its shape, dtype and ``chunks``, the box
each stored shard covers in the global tensor (``offsets``, ``sizes``) and the file and
key that hold it. The chunks of a tensor tile it exactly (`tiles`, checked when the
record is read).

Restoring is plain reads, in any number of processes and on any mesh: each process
reads, for the shard it holds now (or for the whole tensor, without a target), the
chunks that overlap it; a chunk that fits its place is read straight into it, others
into new memory first (verified) and then copied. No collective, no pickle: this
replaces torch.distributed.checkpoint, whose metadata is a pickle and whose shards are
read with ``torch.load``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from checkpointing.errors import CheckpointError, UnsupportedFormatError, UnsupportedTypeError
from checkpointing.format.schema import tiles
from checkpointing.format.tensors import parse_dtype
from checkpointing.format.tree import NAMED, Blob, is_dtensor

DIRECTORY = "sharded"

# (node of a stored chunk, destination or None) -> its tensor; the bytes may still be
# arriving when it returns (see `format.reader.StepReader`)
ReadChunk = Callable[[dict[str, Any], torch.Tensor | None], torch.Tensor]


def group(rank: int) -> str:
    """The blob group (see `format.tree.Blob`) of a process's shards, naming their file:
    in a folder of its own, so no item's file can have that name."""
    return f"{NAMED}{DIRECTORY}/rank{rank}"


PIECE_MIN_BYTES = 1 << 20
"""A shard is stored as up to `PIECES` chunks of whole rows, each at least this large."""
PIECES = 8


def shard_blobs(sharded: dict[str, torch.Tensor], rank: int) -> dict[str, list[Blob]]:
    """Blobs of the shards this process writes, by DTensor key; the writer fills their
    chunk nodes (``offsets``, ``sizes``, then ``file``, ``key``, ``checksum``).

    A large shard is stored as a few chunks of whole rows (`pieces`): a job restoring on
    more processes, whose shards are parts of these, then reads and verifies the chunks
    it needs instead of whole shards of the saving job."""
    out: dict[str, list[Blob]] = {}
    used = set(sharded)  # the file's keys: a DTensor's, or its pieces'
    for key, tensor in sharded.items():
        box = _local_box(tensor, key)
        if box is None or not math.prod(box[1]) or not _writes(tensor):
            continue
        local = tensor.to_local().detach()  # type: ignore[attr-defined]
        offsets, sizes = box
        runs = pieces(sizes, local.element_size())
        if len(runs) == 1:
            out[key] = [Blob(group(rank), key, local, [{"offsets": offsets, "sizes": sizes}])]
            continue
        out[key] = []
        for start, end in runs:
            node = {
                "offsets": [offsets[0] + start, *offsets[1:]],
                "sizes": [end - start, *sizes[1:]],
            }
            name = f"{key}@{start}"
            while name in used:
                name += "'"
            used.add(name)
            out[key].append(Blob(group(rank), name, local[start:end], [node]))
    return out


def pieces(sizes: Sequence[int], itemsize: int) -> list[tuple[int, int]]:
    """A shard's rows (first dimension) as (start, end) runs: as many as a power of two
    up to `PIECES` allows with each at least `PIECE_MIN_BYTES`, so that halving and
    quartering the number of processes cuts between them."""
    rows = sizes[0] if sizes else 1
    count = 1
    while count * 2 <= min(PIECES, rows, math.prod(sizes) * itemsize // PIECE_MIN_BYTES):
        count *= 2
    step = -(-rows // count)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _local_box(tensor: torch.Tensor, key: str) -> tuple[list[int], list[int]] | None:
    """(offsets, sizes) of this process's shard in the global tensor; None off its mesh."""
    if tensor.device_mesh.get_coordinate() is None:  # type: ignore[attr-defined]
        return None
    try:
        (chunk,) = tensor.__create_chunk_list__()  # type: ignore[attr-defined]
    except (RuntimeError, ValueError) as e:  # Partial placements: not a value yet
        raise UnsupportedTypeError(
            f"cannot save the DTensor at {key}: {e}. Reduce it (redistribute to Shard or "
            f"Replicate placements) first"
        ) from e
    return list(chunk.offsets), list(chunk.sizes)


def _writes(tensor: torch.Tensor) -> bool:
    """Whether this process writes its shard: it holds a replica of it only on mesh
    dimensions where its coordinate is 0."""
    coordinate = tensor.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    placements = tensor.placements  # type: ignore[attr-defined]
    return all(c == 0 for c, p in zip(coordinate, placements, strict=True) if p.is_replicate())


def merge(nodes: dict[str, dict[str, Any]], reports: Sequence[dict[str, list[Any]]]) -> None:
    """Put every process's chunk nodes (``reports``, by rank) into the ``dtensor``
    nodes of the record (by key), in a fixed order; they must tile each tensor."""
    for key, node in nodes.items():
        chunks = [c for report in reports for c in report.get(key, [])]
        node["chunks"] = sorted(chunks, key=lambda c: c["offsets"])
        if not tiles(node["shape"], node["chunks"]):
            raise CheckpointError(
                f"the shards of the DTensor at {key} do not cover it exactly once; its "
                f"placements are not supported"
            )


def read(
    body: dict[str, Any],
    dest: torch.Tensor | None,
    read_chunk: ReadChunk,
    settle: Callable[[], None],
    *,
    fresh: bool = False,
) -> torch.Tensor:
    """The value of a ``dtensor`` node, read into ``dest`` (a DTensor on any mesh, or a
    tensor of the full shape) when it has the node's shape; else a new full tensor.
    With ``fresh``, what would go into ``dest`` goes into new memory instead and is
    returned: the whole tensor, or the shard ``dest`` holds if it is a DTensor."""
    if is_legacy(body):
        raise legacy_error()
    shape, dtype = list(body["shape"]), parse_dtype(body["dtype"])
    fits = dest is not None and list(dest.shape) == shape
    if fits and dest is not None and is_dtensor(dest):
        box = _local_box(dest, body["key"])
        local = dest.to_local()  # type: ignore[attr-defined]
        into = torch.empty_like(local) if fresh else local
        if box is not None:
            fill(body, into, box, read_chunk, settle)
        return into if fresh else dest
    into = dest if fits and dest is not None and not fresh else torch.empty(shape, dtype=dtype)
    fill(body, into, ([0] * len(shape), shape), read_chunk, settle)
    return into


def fill(
    body: dict[str, Any],
    into: torch.Tensor,
    box: tuple[list[int], list[int]],
    read_chunk: ReadChunk,
    settle: Callable[[], None],
) -> None:
    """Fill ``into``, the part ``box`` (offsets, sizes) of a ``dtensor`` node's tensor,
    from the chunks that overlap it. A chunk that lies whole in ``into`` where that is
    contiguous memory of its dtype is read straight there; others are read whole (to
    verify them) into new memory and the overlap copied."""
    offsets, sizes = box
    dtype = parse_dtype(body["dtype"])
    for chunk in body["chunks"]:
        overlap = [
            (max(o, c), min(o + s, c + n))
            for o, s, c, n in zip(offsets, sizes, chunk["offsets"], chunk["sizes"], strict=True)
        ]
        if any(start >= end for start, end in overlap):
            continue
        node = {**chunk, "dtype": body["dtype"], "shape": chunk["sizes"]}
        place = into[_slices(overlap, offsets)]
        whole = all(
            (a, b - a) == (c, n)
            for (a, b), c, n in zip(overlap, chunk["offsets"], chunk["sizes"], strict=True)
        )
        if whole and place.is_contiguous() and place.dtype == dtype and place.is_cpu:
            read_chunk(node, place)
            continue
        data = read_chunk(node, None)
        settle()  # its bytes must be in, and verified
        part = data[_slices(overlap, chunk["offsets"])]
        with torch.no_grad():
            place.copy_(part)


def _slices(box: list[tuple[int, int]], origin: Sequence[int]) -> tuple[slice, ...]:
    """``box`` (start, end per dimension) as slices of a tensor that starts at ``origin``."""
    return tuple(slice(a - o, b - o) for (a, b), o in zip(box, origin, strict=True))


def is_legacy(body: dict[str, Any]) -> bool:
    """A ``dtensor`` node saved through torch.distributed.checkpoint (format version 1)."""
    return "chunks" not in body


def legacy_error() -> UnsupportedFormatError:
    return UnsupportedFormatError(
        "this step's sharded tensors were saved through torch.distributed.checkpoint by an "
        "earlier version of checkpointing, whose metadata is a pickle; this version loads "
        "no pickles. Restore the step with that version and save it again"
    )
