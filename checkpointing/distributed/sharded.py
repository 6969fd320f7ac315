"""Sharded tensors (DTensor: FSDP2, tensor parallel) through torch.distributed.checkpoint.

Each rank holds only its shards, so they cannot go into our per-item safetensors files
(those are written once, by the primary). DCP already plans who writes which shard and
reshards on load (saved on N ranks, restored on M), so the DTensors of a step go into
one DCP checkpoint in the step's ``sharded/`` directory. Around it everything else
stays ours: each rank checksums the files it wrote, the primary lists them in the
commit record, and the step appears only when that record is written.

DCP's ``.metadata`` file is a pickle; it is read with an unpickler that builds only
DCP's own metadata classes, so loading a checkpoint still never runs foreign code.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor

from checkpointing.coordination import Coordinator
from checkpointing.errors import CorruptCheckpointError
from checkpointing.format import tensors
from checkpointing.format.record import FileInfo

DIRECTORY = "sharded"


def snapshot(
    sharded: dict[str, torch.Tensor], buffer: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copies of the local shards (``buffer(key, like)`` gives a reusable host tensor),
    wrapped as DTensors of the same mesh and placements."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sharded.items():
        assert isinstance(t, DTensor)
        local = t.to_local()
        buf = buffer(key, local)
        buf.copy_(local)
        out[key] = DTensor.from_local(
            buf, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return out


def save(
    sharded: dict[str, torch.Tensor], directory: Path, coordinator: Coordinator
) -> dict[str, FileInfo]:
    """Write ``sharded`` with DCP (a collective call); return the files this rank wrote,
    by their path in the step directory."""
    writer = FileSystemWriter(directory, sync_files=True, thread_count=1)
    writer.fs = fs = _HashingFileSystem()
    dcp_save(
        sharded,
        storage_writer=writer,
        process_group=getattr(coordinator, "group", None),
        no_dist=not dist.is_initialized(),
    )
    mine = [
        name
        for name in os.listdir(directory)
        if name.startswith(f"__{coordinator.rank}_")
        or (name == ".metadata" and coordinator.rank == 0)  # DCP's coordinator is rank 0
    ]
    return {f"{DIRECTORY}/{name}": fs.info(directory / name) for name in sorted(mine)}


def load(dests: dict[str, torch.Tensor], directory: Path, coordinator: Coordinator) -> None:
    """Fill ``dests`` (DTensors of any mesh, or plain full tensors) in place (collective)."""
    dcp_load(
        dests,
        storage_reader=_SafeReader(directory),
        process_group=getattr(coordinator, "group", None),
        no_dist=not dist.is_initialized(),  # one process reading a job's checkpoint
    )


class _HashingFileSystem(FileSystem):
    """DCP's local file system, checksumming files as DCP writes them: reading them back
    for their checksums cost about half a DCP save (benchmarks/distributed.py)."""

    def __init__(self) -> None:
        super().__init__()
        self._written: dict[str, _HashingStream] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            yield hashing
        self._written[Path(path).name] = hashing

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)
        if Path(path).name in self._written:
            self._written[Path(new_path).name] = self._written.pop(Path(path).name)

    def info(self, path: Path) -> FileInfo:
        """Size and whole-file checksum of a file (no safetensors header:
        ``header_checksum`` stays empty), read back only if DCP did not write it in order."""
        hashing = self._written.get(path.name)
        if hashing is not None and hashing.in_order:
            return FileInfo(hashing.size, "", hashing.hasher.hexdigest())
        with open(path, "rb", buffering=0) as f:
            size, checksum = tensors.stream_checksum(f)
        return FileInfo(size, "", checksum)


class _HashingStream:
    """A write stream that hashes what goes through it, while writes are sequential."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.hasher = xxhash.xxh3_64()
        self.size = 0
        self.in_order = True

    def write(self, data: Any) -> int:
        n: int = self._raw.write(data)
        self.hasher.update(memoryview(data).cast("B")[:n])
        self.size += n
        return n

    def seek(self, *args: Any) -> int:
        self.in_order = False
        return self._raw.seek(*args)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, ...
        return getattr(self._raw, name)


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = Path(self.path) / name
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{path}: not a DCP metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
)
_ALLOWED = {  # what else DCP's metadata pickles refer to; all build plain values
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided etc., looked up by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes, layouts and sizes, and nothing else."""

    def __init__(self, f: io.BytesIO, where: str) -> None:
        super().__init__(f)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # their dataclasses and enums; no functions
                return found
        found = getattr(torch, name, None) if module == "torch" else None
        if isinstance(found, torch.dtype | torch.memory_format | torch.layout):
            return found
        raise CorruptCheckpointError(
            f"{self._where}: refers to {module}.{name}, which DCP metadata never holds; "
            f"refusing to load it (it could run code)"
        )
