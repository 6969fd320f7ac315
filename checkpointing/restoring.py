"""The restore path: find a step's files (local, or downloaded once per node), check what
can be checked, read into the target, verify.

`Restorer` locates the step: a local step is read in place; a step of a remote
directory, or of the remote tier only, is downloaded first (`storage.cache`,
`remote_tier`), only the files the restore needs, checked as they are copied.

A restore reads straight into the target's tensors (no second copy of the state in
memory), so a failure after the first byte landed would leave the target part old, part
new. Everything that can be known before reading is therefore checked first
(`check_before_reading`): every file the restore needs (its size, its header and the
header's checksum), every array's entry and byte count, and whether the target fits:
an ``nn.Module``'s keys and shapes, an optimizer's parameter groups. Objects get
``load_state_dict`` only once every byte read is in and verified. What can only be found
while reading, a tensor failing its checksum, raises `PartialRestoreError` when target
tensors were already written; ``all_or_nothing`` reads everything into new memory first
and changes the target only once all of it checked out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from checkpointing.catalog import StepCatalog
from checkpointing.coordination import Coordinator, PerRank, TensorChannel
from checkpointing.distributed import sharded
from checkpointing.distributed.replicated import SharedReads
from checkpointing.errors import (
    CorruptCheckpointError,
    ItemNotFoundError,
    PartialRestoreError,
    TargetMismatchError,
)
from checkpointing.format import tree
from checkpointing.format.reader import StepReader
from checkpointing.format.record import FileInfo, Record
from checkpointing.format.schema import numpy_dtype
from checkpointing.format.tensors import parse_dtype
from checkpointing.format.verify import file_checksums
from checkpointing.remote_tier import NoRemote
from checkpointing.storage import FsspecStorage, LocalStorage, Storage
from checkpointing.storage.cache import StepCache


@dataclasses.dataclass(frozen=True)
class TensorMetadata:
    """What `CheckpointManager.item_metadata` reports for an array, without reading it.

    Attributes:
        shape: The array's shape.
        dtype: The dtype as saved: a torch dtype's name (``"bfloat16"``), or a numpy
            array's dtype string (``"<f4"``).
        nbytes: The size of its data.
    """

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def describe_items(record: Record) -> dict[str, Any]:
    """A step's items with each array as its `TensorMetadata` (a `PerRank` item: a list
    by rank), from the record alone."""

    def describe(tag: str, body: dict[str, Any], _: Any) -> TensorMetadata:
        dtype = numpy_dtype(body["dtype"]) if tag == "ndarray" else parse_dtype(body["dtype"])
        shape = tuple(body["shape"])
        return TensorMetadata(shape, body["dtype"], dtype.itemsize * math.prod(shape))

    def item(node: tree.Node) -> Any:
        if isinstance(node, dict) and "per_rank" in node:
            return [tree.unflatten(n, describe) for n in node["per_rank"]]
        return tree.unflatten(node, describe)

    return {name: item(node) for name, node in record.items.items()}


class Restorer:
    """Restores and verifies the steps of one manager's directory."""

    def __init__(
        self,
        storage: Storage,
        catalog: StepCatalog,
        remote: NoRemote,
        coordinator: Coordinator,
        *,
        cache: StepCache,
        verify_checksums: bool,
        read_only: bool,
    ) -> None:
        self._storage = storage
        self._catalog = catalog
        self._remote = remote
        self._coordinator = coordinator
        self._cache = cache
        self._verify = verify_checksums
        self._read_only = read_only

    def restore(
        self,
        record: Record,
        target: Mapping[str, Any] | None,
        items: Iterable[str] | None,
        *,
        all_or_nothing: bool,
    ) -> dict[str, Any]:
        step = record.step
        names = list(items) if items is not None else list(target or record.items)
        missing = [n for n in names if n not in record.items]
        if missing:
            raise ItemNotFoundError(
                f"step {step} has no item {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, record.items))}"
            )
        nodes = {n: self._item_node(record, n) for n in names}
        targets = {n: _unwrap(None if target is None else target.get(n)) for n in names}
        needed = set().union(*map(tree.files_of, nodes.values()))
        references: dict[int, set[str]] = {}  # an incremental save's: earlier steps' files
        if record.references:
            for node in nodes.values():
                for origin, files in tree.references_of(node).items():
                    references.setdefault(origin, set()).update(files)

        def where(of_step: int) -> str:
            return f"{self._storage.url}/{self._catalog.folder(of_step)}"

        with self._located(record, needed, references) as (paths, downloaded):
            folders = {s: (LocalStorage(p.parent, create=False), p.name) for s, p in paths.items()}

            def open_file(of_step: int, filename: str) -> BinaryIO:
                store, folder = folders[of_step]
                return store.open_read(f"{folder}/{filename}")

            with StepReader(
                record,
                open_file,
                verify=self._verify and not (needed <= downloaded and not references),
                where=where,
            ) as reader:
                restored = restore_items(
                    nodes,
                    targets,
                    reader,
                    all_or_nothing=all_or_nothing,
                    where=where(step),
                    share=self._share(record, nodes, reader),
                )
        return restored if target is None else {**target, **restored}

    def _share(
        self, record: Record, nodes: Mapping[str, tree.Node], reader: StepReader
    ) -> SharedReads | None:
        """In a job of several processes, the reads of the replicated items split among
        them (`distributed.replicated`); not for `PerRank` items, each process's own."""
        channel = self._coordinator
        if not (isinstance(channel, TensorChannel) and channel.world_size > 1):
            return None
        replicated = [node for n, node in nodes.items() if not _per_rank(record.items[n])]
        return SharedReads(channel, reader, record.step, replicated)

    @contextlib.contextmanager
    def _located(
        self, record: Record, needed: set[str], references: Mapping[int, set[str]]
    ) -> Iterator[tuple[dict[int, Path], set[str]]]:
        """Hold local folders with the ``needed`` files of a step and the files of earlier
        steps it reads (``references``): the folder by step, and which of the step's files
        this call downloaded (and so just verified). A local step is read where it is. A
        remote-only step of a mirrored manager is downloaded into its local directory,
        with the steps it reads, where they become local steps; a step of a remote
        directory, or read-only of the remote tier, goes through the cache
        (`storage.cache`), as do the steps it reads."""
        step = record.step
        steps = [step, *sorted(references)]
        local = self._storage
        if (
            self._catalog.record(step) is None
            and not self._read_only
            and isinstance(local, LocalStorage)
        ):
            for s in [*steps[1:], step]:  # the steps it reads first
                self._download(local, s, of=step)
            yield {s: local.root / self._catalog.folder(s) for s in steps}, set(record.files)
            return
        paths: dict[int, Path] = {}
        downloaded: set[str] = set()
        with contextlib.ExitStack() as held:
            for s in steps:
                storage, folder, of_record = self._tier(s, of=step)
                if isinstance(storage, LocalStorage):
                    paths[s] = storage.root / folder
                    continue
                assert isinstance(storage, FsspecStorage)
                files = needed if s == step else references[s]
                paths[s], fetched = held.enter_context(
                    self._cache.holding(storage, folder, of_record, files)
                )
                if s == step:
                    downloaded = fetched
            yield paths, downloaded

    def _tier(self, step: int, of: int) -> tuple[Storage, str, Record]:
        """Where a step is (local tier first) and its record; ``of``: the step that
        reads it (an incremental save), or itself."""
        record = self._catalog.record(step)
        if record is not None:
            return self._storage, self._catalog.folder(step), record
        record = self._remote.known().get(step)
        if record is None:
            raise CorruptCheckpointError(
                f"step {of} is an incremental save that reads files of step {step}, which "
                f"neither tier holds; restore another step"
            )
        return (*self._remote.location(step), record)

    def _download(self, local: LocalStorage, step: int, of: int) -> None:
        """Make a step of the remote tier a local one (``of``: the step that reads it,
        or itself), unless it is one already."""
        if self._catalog.record(step) is None:
            _, _, record = self._tier(step, of)
            self._remote.copy_into(step, record, local, self._catalog.folder(step))
            self._catalog.add(step, record)

    def _item_node(self, record: Record, name: str) -> tree.Node:
        """An item's tree; of a `PerRank` item, this process's own."""
        node = record.items[name]
        if not _per_rank(node):
            return node
        saved_by, world = len(node["per_rank"]), self._coordinator.world_size
        if saved_by != world:
            raise ItemNotFoundError(
                f"item {name!r} of step {record.step} holds the own state of each of the "
                f"{saved_by} processes that saved it; this job has {world}. Restore the "
                f"other items (items=[...]) and start this one afresh."
            )
        return node["per_rank"][self._coordinator.rank]

    def verify(self, record: Record) -> None:
        """Check every file of a step, and those of earlier steps it reads, against its
        record; `CorruptCheckpointError` naming the first bad file."""
        step = record.step
        listed = [(step, record.files), *sorted(record.references.items())]
        for of_step, files in listed:
            storage, folder, _ = self._tier(of_step, of=step)
            for filename, info in files.items():
                path = f"{folder}/{filename}"
                where = f"{storage.url}/{path}"
                check_file(functools.partial(storage.open_read, path), info, where)


def check_file(open_file: Callable[[], BinaryIO], info: FileInfo, where: str) -> None:
    """Raise `CorruptCheckpointError` unless the file has the size and checksums of its
    record."""
    try:
        f = open_file()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where} is missing") from None
    with f:
        size = f.seek(0, 2)
        if size != info.size:
            raise CorruptCheckpointError(
                f"{where}: size {size} bytes, the commit record says {info.size}"
            )
        checksums = file_checksums(f, where, opaque=not info.header_checksum)
    if checksums != (info.header_checksum, info.checksum):
        raise CorruptCheckpointError(f"{where}: checksum mismatch; the file is corrupt")


def _per_rank(node: tree.Node) -> bool:
    """Whether an item's node holds each process's own state (a `PerRank` item)."""
    return isinstance(node, dict) and "per_rank" in node


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, PerRank) else value


def restore_items(
    nodes: Mapping[str, tree.Node],
    targets: Mapping[str, Any],
    reader: StepReader,
    *,
    all_or_nothing: bool,
    where: str,
    share: SharedReads | None = None,
) -> dict[str, Any]:
    """Rebuild each item of ``nodes`` into its target (or anew where it is None); with
    ``share``, every process of the job does so together, each reading a share of the
    replicated tensors."""

    def check() -> None:
        check_before_reading(nodes, targets, reader, where)

    settle = reader.settle if share is None else share.settle
    if share is None:
        check()
    else:
        share.agree(check)
    staged: dict[int, Any] = {}
    if all_or_nothing:
        for name, node in nodes.items():
            for tag, body, dest in tree.walk(node, targets[name]):
                if tag != "stateful" and id(body) not in staged:
                    into = dest if isinstance(dest, torch.Tensor) else None  # as unflatten
                    staged[id(body)] = _read(reader, share, tag, body, into, fresh=True)
        settle()

    def read(tag: str, body: dict[str, Any], dest: torch.Tensor | None) -> Any:
        if all_or_nothing:
            return _place(tag, body, staged[id(body)], dest)
        return _read(reader, share, tag, body, dest, fresh=False)

    loads: list[tuple[Any, Any]] = []  # load_state_dict once all is read and verified
    try:
        restored = {
            name: tree.unflatten(node, read, targets[name], lambda *load: loads.append(load))
            for name, node in nodes.items()
        }
        settle()
    except CorruptCheckpointError as e:
        if not (reader.touched or (share is not None and share.touched)):
            raise
        raise PartialRestoreError(
            f"{str(e).rstrip('.')}. The target was partly overwritten with this step's "
            f"values before the damage was found: restore another step into it, or pass "
            f"all_or_nothing=True to change it only once everything checked out"
        ) from e
    for obj, state in loads:
        if not _loads_as_torch(obj):
            obj.load_state_dict(state)  # the user's own code: its errors are its own
            continue
        try:
            obj.load_state_dict(state)
        except Exception as e:  # a crafted state may still upset torch's loader
            raise TargetMismatchError(
                f"{where}: the saved state does not fit the {type(obj).__name__} it is "
                f"restored into: {type(e).__name__}: {e}"
            ) from e
    return restored


def _read(
    reader: StepReader,
    share: SharedReads | None,
    tag: str,
    body: dict[str, Any],
    dest: torch.Tensor | None,
    *,
    fresh: bool,
) -> Any:
    """An array node's value, read into ``dest`` where it fits, unless ``fresh``."""
    if share is not None:
        if share.shares(tag, body):
            return share.read(body, None if fresh else dest)
        return share.alone(lambda: _read(reader, None, tag, body, dest, fresh=fresh))
    if tag == "dtensor":

        def read_chunk(chunk: dict[str, Any], into: torch.Tensor | None) -> torch.Tensor:
            return reader.read("tensor", chunk, into)  # type: ignore[no-any-return]

        return sharded.read(body, dest, read_chunk, reader.settle, fresh=fresh)
    return reader.read(tag, body, None if fresh else dest)


def _place(tag: str, body: dict[str, Any], value: Any, dest: torch.Tensor | None) -> Any:
    """A staged value, copied into ``dest`` where a direct read would have filled it."""
    if dest is None or not isinstance(value, torch.Tensor):
        return value
    if tag == "dtensor" and list(dest.shape) == body["shape"]:
        with torch.no_grad():  # a DTensor's shard, or the whole tensor
            (dest.to_local() if tree.is_dtensor(dest) else dest).copy_(value)  # type: ignore[attr-defined]
        return dest
    if dest.shape == value.shape and dest.dtype == value.dtype:
        with torch.no_grad():
            dest.copy_(value)
        return dest
    return value


def check_before_reading(
    nodes: Mapping[str, tree.Node], targets: Mapping[str, Any], reader: StepReader, where: str
) -> None:
    """Raise what a restore of ``nodes`` into ``targets`` would raise for damaged files
    or a target that does not fit, before anything is read into the target."""
    for name, node in nodes.items():
        for tag, body, dest in tree.walk(node, targets[name]):
            if tag == "stateful":
                _check_fits(body, dest, f"{where}: item {name!r}")
            elif tag == "dtensor":
                if sharded.is_legacy(body):
                    raise sharded.legacy_error()
                for chunk in body["chunks"]:
                    reader.check({**chunk, "dtype": body["dtype"], "shape": chunk["sizes"]})
            elif tag == "ndarray":
                itemsize = numpy_dtype(body["dtype"]).itemsize
                reader.check(body, math.prod(body["shape"]) * itemsize)
            else:
                reader.check(body)


def _check_fits(node: tree.Node, obj: Any, where: str) -> None:
    """Raise `TargetMismatchError` where ``obj.load_state_dict`` would refuse the saved
    state: for modules and optimizers whose loading is torch's own."""
    if isinstance(obj, torch.nn.Module) and _loads_as_torch(obj):
        _check_module(node, obj, where)
    elif isinstance(obj, torch.optim.Optimizer) and _loads_as_torch(obj):
        _check_optimizer(node, obj, where)


def _loads_as_torch(obj: Any) -> bool:
    """Whether ``obj`` loads its state with torch's own code (a module or optimizer
    without overrides, or module hooks that could rename keys)."""
    if isinstance(obj, torch.nn.Module):
        return type(obj).load_state_dict is torch.nn.Module.load_state_dict and not any(
            m._load_state_dict_pre_hooks for m in obj.modules()
        )
    return (
        isinstance(obj, torch.optim.Optimizer)
        and type(obj).load_state_dict is torch.optim.Optimizer.load_state_dict
    )


def _check_module(node: tree.Node, module: torch.nn.Module, where: str) -> None:
    pairs = _pairs(node)
    if pairs is None:
        raise TargetMismatchError(f"{where}: the checkpoint holds no module state here")
    saved = dict(pairs)
    current = module.state_dict()
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing from the checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"not in the module: {_few(unexpected)}")
    for key, value in current.items():
        if key not in saved or not isinstance(value, torch.Tensor):
            continue
        shape = _saved_shape(saved[key])
        if shape is None:
            problems.append(f"{key}: not a tensor in the checkpoint")
        elif not torch.nn.parameter.is_lazy(value) and list(value.shape) != shape:
            problems.append(f"{key}: {shape} in the checkpoint, {list(value.shape)} here")
    if problems:
        raise TargetMismatchError(
            f"{where} does not fit the {type(module).__name__} it is restored into: "
            f"{'; '.join(problems[:5])}. Nothing was changed"
        )


def _check_optimizer(node: tree.Node, optimizer: torch.optim.Optimizer, where: str) -> None:
    fields = dict(_pairs(node) or [])
    groups, state = fields.get("param_groups"), fields.get("state")
    saved: list[int] | None = None
    if isinstance(groups, list) and _pairs(state) is not None:
        saved = []
        for group in groups:
            params = dict(_pairs(group) or []).get("params")
            if not (isinstance(params, list) and all(type(p) is int for p in params)):
                saved = None
                break
            saved.append(len(params))
    if saved is None:
        raise TargetMismatchError(
            f"{where}: the checkpoint holds no optimizer state here (state and "
            f"param_groups with their params). Nothing was changed"
        )
    here = [len(g["params"]) for g in optimizer.param_groups]
    if saved != here:
        raise TargetMismatchError(
            f"{where}: the checkpoint's optimizer has parameter groups of {saved} "
            f"parameters, this one of {here}. Nothing was changed"
        )


def _pairs(node: tree.Node) -> list[tuple[Any, tree.Node]] | None:
    """The (key, node) pairs of a dict node, or None for other nodes."""
    if isinstance(node, dict) and "dict" in node:
        return [(key, child) for key, child in node["dict"]]
    return None


def _saved_shape(node: tree.Node) -> list[int] | None:
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag in ("tensor", "dtensor"):
            return list(body["shape"])
    return None


def _few(keys: list[Any]) -> str:
    return ", ".join(map(repr, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
