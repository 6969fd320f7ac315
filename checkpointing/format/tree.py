"""Nested state <-> a JSON tree plus a list of tensor blobs.

The JSON tree keeps the structure and every non-tensor leaf, exactly: a node is a JSON
scalar (int, str, bool, null, finite float), a list, or a one-key object tagged with its
kind (``dict``, ``tuple``, ``float``, ``bytes``, ``npscalar``, ``tensor``, ``ndarray``,
``dtensor``; an item saved by every rank for itself is ``per_rank``, a list by rank).
Dicts are stored as ``[key, node]`` pairs so int keys (optimizer state) stay ints.

Tensors become `Blob`s that `format.tensors` writes into safetensors files; their tree
nodes say which file and key hold the bytes. Tensors that share storage are stored once:
identical views point at the same blob, other views of one storage point at a blob of
the whole storage with their own offset and strides, so restore shares them again.

Nothing here is pickle: reading a tree never runs code.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from checkpointing.errors import CorruptCheckpointError, UnsupportedTypeError
from checkpointing.format import schema
from checkpointing.format.schema import MAX_DEPTH, TORCH_DTYPES

Node = Any  # a JSON value
SUPPORTED = (
    "torch.Tensor, numpy.ndarray, numpy scalars, int, float, bool, str, bytes, None, "
    "list, tuple, dict with str or int keys, and objects with state_dict()/load_state_dict()"
)


LEAVES = ""  # the group of the arrays that are items themselves; they share one file
NAMED = "\0"  # starts the group of blobs whose file is named by the rest (a process's shards)


@dataclasses.dataclass
class Blob:
    """One run of bytes to store: a tensor (or a whole shared storage)."""

    group: str  # the file it goes to: its item's name, or LEAVES
    key: str  # unique within the group
    tensor: torch.Tensor
    nodes: list[dict[str, Any]]  # tree nodes reading these bytes; the writer adds file/key

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclasses.dataclass
class FlatState:
    items: dict[str, Node]
    blobs: list[Blob]
    # DTensors (shards of a tensor spread over ranks) by a key unique in the state; they
    # are written by `checkpointing.distributed.sharded`, not into our files.
    sharded: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def is_stateful(obj: object) -> bool:
    """Objects restored in place: modules, optimizers, schedulers, user objects."""
    return (
        not isinstance(obj, Mapping)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def unwrapped(obj: Any) -> Any:
    """The module a ``torch.compile``'d one wraps (``_orig_mod``), else ``obj``: its state
    is saved and restored without the wrapper's ``_orig_mod.`` key prefix, so compiled and
    plain modules restore into each other."""
    inner = getattr(obj, "_orig_mod", None)
    return inner if isinstance(obj, torch.nn.Module) and isinstance(inner, torch.nn.Module) else obj


def to_state(obj: Any) -> Any:
    """The saveable value of ``obj``: its state_dict() when it has one."""
    return unwrapped(obj).state_dict() if is_stateful(obj) else obj


def flatten(state: Mapping[str, Any]) -> FlatState:
    """Split a mapping of items into JSON trees and tensor blobs.

    Raises `UnsupportedTypeError` naming the path of the first leaf that cannot be
    stored, before anything is written.
    """
    flattener = _Flattener()
    items = {name: flattener.node(to_state(value), name, (name,)) for name, value in state.items()}
    flattener.share_views()
    return FlatState(items=items, blobs=flattener.blobs, sharded=flattener.sharded)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _Flattener:
    def __init__(self) -> None:
        self.blobs: list[Blob] = []
        self.sharded: dict[str, torch.Tensor] = {}
        self._keys: dict[str, set[str]] = {}
        # storage identity -> [(tensor, node, group, key)], to find shared storage
        self._by_storage: dict[
            tuple[str, int], list[tuple[torch.Tensor, dict[str, Any], str, str]]
        ] = {}

    def node(self, value: Any, item: str, path: tuple[Any, ...]) -> Node:
        if len(path) > MAX_DEPTH + 1:  # readers refuse deeper trees (format.schema)
            raise UnsupportedTypeError(
                f"cannot save {_path(path[:3])}/...: the state is nested more than "
                f"{MAX_DEPTH} levels deep"
            )
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":  # before float:
            # np.float64 is a float subclass, and must come back as np.float64
            return {"npscalar": [value.dtype.str, base64.b64encode(value.tobytes()).decode()]}
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, item, path)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, item, path)
        if isinstance(value, bytes):
            return {"bytes": base64.b64encode(value).decode()}
        if isinstance(value, Mapping):
            pairs = []
            for key, child in value.items():
                if not isinstance(key, str | int) or isinstance(key, bool):
                    raise UnsupportedTypeError(
                        f"cannot save dict key {key!r} ({type(key).__name__}) at "
                        f"{_path(path)}: keys must be str or int"
                    )
                pairs.append([key, self.node(to_state(child), item, (*path, key))])
            return {"dict": pairs}
        if type(value) is list:
            return [self.node(to_state(v), item, (*path, i)) for i, v in enumerate(value)]
        if type(value) is tuple:
            return {
                "tuple": [self.node(to_state(v), item, (*path, i)) for i, v in enumerate(value)]
            }
        raise UnsupportedTypeError(
            f"cannot save {type(value).__module__}.{type(value).__qualname__} at "
            f"{_path(path)}. Supported: {SUPPORTED}. Convert it, or give it "
            f"state_dict()/load_state_dict()."
        )

    def _tensor(self, tensor: torch.Tensor, item: str, path: tuple[Any, ...]) -> Node:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in TORCH_DTYPES:  # readers refuse it (format.schema)
            raise UnsupportedTypeError(
                f"cannot save a tensor of dtype {tensor.dtype} at {_path(path)}: "
                f"supported are {', '.join(sorted(TORCH_DTYPES))}"
            )
        if type(tensor) not in _PLAIN_TENSORS:  # checked first: the MRO walk is slower
            if is_dtensor(tensor):
                key = _path(path)
                self.sharded[key] = tensor.detach()
                return {"dtensor": {"key": key, "dtype": dtype, "shape": list(tensor.shape)}}
            raise UnsupportedTypeError(
                f"cannot save tensor subclass {type(tensor).__name__} at {_path(path)}: "
                f"convert it to a plain tensor (sharded tensors need torch.distributed)"
            )
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
            raise UnsupportedTypeError(
                f"cannot save a {tensor.layout} / quantized / meta tensor at {_path(path)}: "
                f"only dense tensors with data are supported"
            )
        tensor = tensor.detach()
        if tensor.is_conj() or tensor.is_neg():  # lazy views: their bytes are not their value
            tensor = tensor.resolve_conj().resolve_neg()
        node: dict[str, Any] = {"dtype": dtype, "shape": list(tensor.shape)}
        group, key = self._place(item, path)
        if tensor.numel():
            ident = (str(tensor.device), tensor.untyped_storage().data_ptr())
            self._by_storage.setdefault(ident, []).append((tensor, node, group, key))
        else:
            self.blobs.append(Blob(group, key, tensor, [node]))
        return {"tensor": node}

    def _ndarray(self, array: np.ndarray, item: str, path: tuple[Any, ...]) -> Node:
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise UnsupportedTypeError(
                f"cannot save a numpy array of Python objects or of a structured dtype at "
                f"{_path(path)}; save its fields as separate arrays"
            )
        node: dict[str, Any] = {"dtype": array.dtype.str, "shape": list(array.shape)}
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        try:  # what readers refuse (format.schema) is refused here, before any I/O
            schema.numpy_dtype(array.dtype.str)
            readable = schema.valid_text(raw, array.dtype)
        except CorruptCheckpointError:
            readable = False
        if not readable:
            raise UnsupportedTypeError(
                f"cannot save the numpy array at {_path(path)}: dtype {array.dtype} (a "
                f"datetime of no unit, or text that is not code points) does not read back"
            )
        with warnings.catch_warnings():  # read-only arrays are fine: we only read them
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(raw)
        self.blobs.append(Blob(*self._place(item, path), data, [node]))
        return {"ndarray": node}

    def share_views(self) -> None:
        """Turn the tensors seen into blobs, storing shared storage once."""
        for group in self._by_storage.values():
            first, _, place, key = group[0]
            nodes = [node for _, node, _, _ in group]
            if all(_same_view(first, t) for t, *_ in group[1:]):
                self.blobs.append(Blob(place, key, first, nodes))
                continue
            # Views that differ: store the whole storage once, each node as a view of it.
            storage = first.untyped_storage()
            whole = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage)
            for tensor, node, _, _ in group:
                node.update(offset=tensor.storage_offset(), stride=list(tensor.stride()))
            self.blobs.append(Blob(place, self._unique_key(place, f"{key}~storage"), whole, nodes))

    def _place(self, item: str, path: tuple[Any, ...]) -> tuple[str, str]:
        """The group and unique key of the array at ``path`` (its path inside the item)."""
        group = item if len(path) > 1 else LEAVES
        return group, self._unique_key(group, "/".join(str(p) for p in path[1:]) or item)

    def _unique_key(self, group: str, base: str) -> str:
        taken = self._keys.setdefault(group, set())
        key, n = base, 1
        while key in taken or key == "__metadata__":
            key, n = f"{base}~{n}", n + 1
        taken.add(key)
        return key


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A `torch.distributed.tensor.DTensor`, told without importing torch.distributed."""
    return any(
        c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed")
        for c in type(tensor).__mro__
    )


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
    )


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


ARRAY_TAGS = ("tensor", "ndarray", "dtensor")


def walk(node: Node, target: Any = None) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every array node of a tree as (tag, body, the part of ``target`` in its place),
    matched as `unflatten` matches them; also ``("stateful", node, obj)`` before the
    nodes of each object restored with ``load_state_dict``."""
    if is_stateful(target):
        target = unwrapped(target)
        yield "stateful", node, target
        target = target.state_dict()
    if isinstance(node, list):
        for i, child in enumerate(node):
            yield from walk(child, _nth(target, i, len(node)))
        return
    if not isinstance(node, dict):
        return
    ((tag, body),) = node.items()
    if tag in ARRAY_TAGS:
        yield tag, body, target
    elif tag == "dict":
        sub = target if isinstance(target, Mapping) else {}
        for key, child in body:
            yield from walk(child, sub.get(key))
    elif tag == "tuple":
        for i, child in enumerate(body):
            yield from walk(child, _nth(target, i, len(body)))


def files_of(node: Node) -> set[str]:
    """The data files of its own step that the arrays of a tree live in (a sharded
    tensor: those of all its chunks)."""
    files: set[str] = set()
    for tag, body, _ in walk(node):
        for stored in body.get("chunks", []) if tag == "dtensor" else [body]:
            if "file" in stored and "step" not in stored:  # (a retired dtensor node has none)
                files.add(stored["file"])
    return files


def references_of(node: Node) -> dict[int, set[str]]:
    """The files of earlier steps that arrays of a tree live in (an incremental save),
    by step."""
    found: dict[int, set[str]] = {}
    for tag, body, _ in walk(node):
        for stored in body.get("chunks", []) if tag == "dtensor" else [body]:
            if "step" in stored:
                found.setdefault(stored["step"], set()).add(stored["file"])
    return found


ReadArray = Callable[[str, dict[str, Any], "torch.Tensor | None"], Any]


def _load_now(obj: Any, state: Any) -> None:
    obj.load_state_dict(state)


def unflatten(
    node: Node, read: ReadArray, target: Any = None, load: Callable[[Any, Any], None] = _load_now
) -> Any:
    """Rebuild a value from its tree.

    ``read(tag, body, dest)`` returns the value of an array node, filled into ``dest``
    when ``dest`` is a matching tensor of the target (possibly before its bytes are in).
    Stateful targets are returned themselves; their rebuilt state goes to
    ``load(obj, state)``, which loads it (``load_state_dict``) at once by default: a
    caller may load later, once every byte read is in and verified.
    """
    if is_stateful(target):
        inner = unwrapped(target)
        load(inner, unflatten(node, read, inner.state_dict(), load))
        return target
    if node is None or isinstance(node, bool | int | str | float):
        return node
    if isinstance(node, list):
        return [unflatten(n, read, _nth(target, i, len(node)), load) for i, n in enumerate(node)]
    ((tag, body),) = node.items()
    if tag == "dict":
        sub = target if isinstance(target, Mapping) else {}
        return {k: unflatten(v, read, sub.get(k), load) for k, v in body}
    if tag == "tuple":
        return tuple(
            unflatten(n, read, _nth(target, i, len(body)), load) for i, n in enumerate(body)
        )
    if tag == "float":
        return float(body)
    if tag == "bytes":
        return base64.b64decode(body)
    if tag == "npscalar":
        dtype, data = body
        return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype))[0]
    if tag in ARRAY_TAGS:
        return read(tag, body, target if isinstance(target, torch.Tensor) else None)
    raise ValueError(f"unknown tree node {tag!r}")


def _nth(target: Any, i: int, length: int) -> Any:
    if isinstance(target, list | tuple) and len(target) == length:
        return target[i]
    return None
