"""What a well-formed commit record is, checked in full before any of it is used.

A record is untrusted input. Everything past this check may rely on the types and
ranges below: every tree node is one of the kinds of `format.tree`, every array names a
file the record lists with a safe name (`format.paths`), dtypes are ones the readers
know (numpy dtypes without Python objects), shapes and offsets are non-negative
integers of bounded size, nesting is at most `MAX_DEPTH` deep. Sizes that depend on
the data files (does the tensor fit its file?) are checked by the readers against the
files themselves.

Every violation is a `CorruptCheckpointError` naming the record and the place in it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from checkpointing.errors import CorruptCheckpointError
from checkpointing.format.paths import is_safe_name

MAX_DEPTH = 100  # nested containers in a state; `tree.flatten` refuses deeper states
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
MAX_ELEMENTS = 1 << 62  # of one array; real sizes are then checked against its file
MAX_TIME = 1e11  # seconds since the epoch: the year 5138
DIGEST = re.compile(r"[0-9a-f]{16}")  # xxh3-64, hex

# The dtypes of tensors this library saves and restores (`tree.flatten` refuses others):
# all but the quantized ones, whose tensors are not plain bytes (reading raw bytes into
# one crashes the process).
TORCH_DTYPES = {
    name: d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype)
    and not (name := str(d).removeprefix("torch.")).startswith(("qint", "quint"))
}


class _Invalid(Exception):
    """A violation, with the path to it inside the record."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def check_body(body: Any, where: str, *, version: int) -> None:
    """Raise `CorruptCheckpointError` unless ``body`` (a parsed record of format
    ``version``) is well-formed."""
    try:
        _check_body(body, version)
    except _Invalid as e:
        raise CorruptCheckpointError(f"{where}: malformed commit record at {e}") from None
    except Exception as e:  # anything else this check did not foresee is damage too
        raise CorruptCheckpointError(
            f"{where}: malformed commit record ({type(e).__name__}: {e})"
        ) from None


def _check_body(body: Any, version: int) -> None:
    _require(isinstance(body, dict), "record", "not a JSON object")
    _require(_is_int(body.get("step")) and body["step"] >= 0, "step", "not an int >= 0")
    for name in ("created_at", "committed_at"):
        value = body.get(name)
        _require(_is_number(value) and 0 <= value <= MAX_TIME, name, "not a time since the epoch")
    for name in ("metrics", "metadata"):
        value = body.get(name)
        _require(value is None or isinstance(value, dict), name, "not an object or null")
        _check_json(value, name, 0)
    files = body.get("files")
    _require(isinstance(files, dict), "files", "not an object")
    for name, info in files.items():
        _check_file(name, info, version)
    folders = {name.rpartition("/")[0] for name in files} - {""}
    clash = sorted(folders & set(files))
    _require(not clash, "files", f"{clash[:1]} is a file and a folder")
    references = body.get("references", {})
    _require(version >= 3 or "references" not in body, "references", "not in this version")
    _require(isinstance(references, dict), "references", "not an object")
    for step, listed in references.items():
        path = f"references/{step}"
        _require(
            step.isascii() and step.isdigit() and str(int(step)) == step
            and int(step) < body["step"],
            path,
            "not an earlier step",
        )
        _require(isinstance(listed, dict) and bool(listed), path, "not an object of files")
        for name, info in listed.items():
            _check_file(name, info, version, f"{path}/{name}")
    items = body.get("items")
    _require(isinstance(items, dict), "items", "not an object")
    checker = _TreeChecker(files, version, references)
    for name, node in items.items():
        path = f"items/{name}"
        if isinstance(node, dict) and len(node) == 1 and "per_rank" in node:
            trees = node["per_rank"]
            _require(isinstance(trees, list), path, "per_rank is not a list")
            for rank, tree in enumerate(trees):
                checker.node(tree, f"{path}/per_rank/{rank}", 0)
        else:
            checker.node(node, path, 0)


def _check_file(name: str, info: Any, version: int, path: str | None = None) -> None:
    path = path or f"files/{name}"
    _require(is_safe_name(name), path, "not a plain file name inside the step")
    _require(isinstance(info, dict), path, "not an object")
    _require(set(info) == {"size", "header_checksum", "checksum"}, path, "wrong fields")
    _require(_is_int(info["size"]) and info["size"] >= 0, f"{path}/size", "not an int >= 0")
    _require(_is_digest(info["checksum"]), f"{path}/checksum", "not an xxh3-64 digest")
    header = info["header_checksum"]
    # Version 1 listed DCP's own files, which have no safetensors header.
    legacy = version == 1 and header == ""
    _require(legacy or _is_digest(header), f"{path}/header_checksum", "not an xxh3-64 digest")


class _TreeChecker:
    """Checks item trees (format.tree) against the record's list of files."""

    def __init__(
        self, files: Mapping[str, Any], version: int, references: Mapping[str, Any]
    ) -> None:
        self._files = files
        self._version = version
        self._references = references
        # (step, file, key) -> whether a DTensor chunk reads it: a chunk's bytes belong to
        # it alone, so no claim of the record can make a restore allocate them twice
        self._entries: dict[tuple[int | None, str, str], bool] = {}

    def node(self, node: Any, path: str, depth: int) -> None:
        _require(depth <= MAX_DEPTH, path, f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, bool | int | str):
            return
        if isinstance(node, float):
            _require(math.isfinite(node), path, "a non-finite number")
            return
        if isinstance(node, list):
            for i, child in enumerate(node):
                self.node(child, f"{path}/{i}", depth + 1)
            return
        _require(isinstance(node, dict) and len(node) == 1, path, "not a tree node")
        ((tag, body),) = node.items()
        check = getattr(self, f"_{tag}", None) if tag in _TAGS else None
        _require(check is not None, path, f"unknown node kind {tag!r}")
        assert check is not None
        check(body, f"{path}/{tag}", depth)

    def _dict(self, body: Any, path: str, depth: int) -> None:
        _require(isinstance(body, list), path, "not a list of pairs")
        for i, pair in enumerate(body):
            _require(isinstance(pair, list) and len(pair) == 2, f"{path}/{i}", "not a pair")
            key, child = pair
            _require(isinstance(key, str) or _is_int(key), f"{path}/{i}", "not a str or int key")
            self.node(child, f"{path}/{key}", depth + 1)

    def _tuple(self, body: Any, path: str, depth: int) -> None:
        _require(isinstance(body, list), path, "not a list")
        for i, child in enumerate(body):
            self.node(child, f"{path}/{i}", depth + 1)

    def _float(self, body: Any, path: str, depth: int) -> None:
        _require(body in ("nan", "inf", "-inf"), path, "not nan, inf or -inf")

    def _bytes(self, body: Any, path: str, depth: int) -> None:
        _require(isinstance(body, str), path, "not base64 text")
        _b64(body, path)

    def _npscalar(self, body: Any, path: str, depth: int) -> None:
        _require(isinstance(body, list) and len(body) == 2, path, "not [dtype, base64]")
        dtype = _numpy_dtype(body[0], path)
        _require(isinstance(body[1], str), path, "not base64 text")
        data = _b64(body[1], path)
        _require(len(data) == dtype.itemsize, path, "wrong number of bytes")
        _require(valid_text(data, dtype), path, "not text: invalid code points")

    def _ndarray(self, body: Any, path: str, depth: int) -> None:
        self._array(body, path)
        _numpy_dtype(body.get("dtype"), path)

    def _tensor(self, body: Any, path: str, depth: int) -> None:
        self._array(body, path)
        _require(_is_torch_dtype(body.get("dtype")), f"{path}/dtype", "not a torch dtype")
        if "stride" in body or "offset" in body:  # a view into a shared storage
            offset, stride = body.get("offset"), body.get("stride")
            _require(
                _is_int(offset) and 0 <= offset <= MAX_ELEMENTS, f"{path}/offset", "not an int >= 0"
            )
            _require(
                isinstance(stride, list)
                and len(stride) == len(body["shape"])
                and all(_is_int(s) and 0 <= s <= MAX_ELEMENTS for s in stride),
                f"{path}/stride",
                "not a list of ints >= 0, one per dimension",
            )

    def _dtensor(self, body: Any, path: str, depth: int) -> None:
        _require(isinstance(body, dict), path, "not an object")
        _require(isinstance(body.get("key"), str), f"{path}/key", "not a str")
        _require(_is_torch_dtype(body.get("dtype")), f"{path}/dtype", "not a torch dtype")
        shape = _shape(body.get("shape"), f"{path}/shape")
        if self._version == 1 and "chunks" not in body:
            return  # stored by torch.distributed.checkpoint; refused when restored
        chunks = body.get("chunks")
        _require(isinstance(chunks, list), f"{path}/chunks", "not a list")
        for i, chunk in enumerate(chunks):
            where = f"{path}/chunks/{i}"
            self._stored(chunk, where, chunk=True)
            offsets = chunk.get("offsets")
            sizes = _shape(chunk.get("sizes"), f"{where}/sizes")
            _require(
                isinstance(offsets, list)
                and len(offsets) == len(sizes) == len(shape)
                and all(
                    _is_int(o) and o >= 0 and o + s <= d
                    for o, s, d in zip(offsets, sizes, shape, strict=True)
                ),
                f"{where}/offsets",
                "the chunk is not inside the tensor",
            )
        _require(tiles(shape, chunks), f"{path}/chunks", "the chunks do not tile the tensor")

    def _array(self, body: Any, path: str) -> None:
        self._stored(body, path)
        _shape(body.get("shape"), f"{path}/shape")

    def _stored(self, body: Any, path: str, *, chunk: bool = False) -> None:
        """The fields saying where bytes lie: ``file``, ``key``, ``checksum``, and
        ``step`` when the file is one of an earlier step (`Record.references`)."""
        _require(isinstance(body, dict), path, "not an object")
        name = body.get("file")
        step = body.get("step")
        if step is None:
            files = self._files
        else:
            _require(_is_int(step), f"{path}/step", "not a referenced step")
            files = self._references.get(str(step), {})
        _require(
            isinstance(name, str) and name in files,
            f"{path}/file",
            "not a file of the record",
        )
        _require(isinstance(body.get("key"), str), f"{path}/key", "not a str")
        _require(_is_digest(body.get("checksum")), f"{path}/checksum", "not an xxh3-64 digest")
        entry = (step, name, body["key"])
        seen = self._entries.get(entry)
        _require(seen is None or not (chunk or seen), path, "reads a DTensor chunk's bytes")
        self._entries[entry] = chunk


def tiles(shape: Sequence[int], chunks: Sequence[dict[str, Any]]) -> bool:
    """Whether ``chunks`` (with ``offsets`` and ``sizes``) cover a tensor of ``shape``
    exactly once. DTensor shards form a grid: along each dimension their intervals
    partition it, and every combination of intervals is one chunk."""
    if not math.prod(shape):
        return not chunks
    if any(not math.prod(c["sizes"]) for c in chunks):
        return False
    cells = 1
    for dim, length in enumerate(shape):
        spans = sorted({(c["offsets"][dim], c["sizes"][dim]) for c in chunks})
        at = 0
        for start, size in spans:
            if start != at:
                return False
            at += size
        if at != length:
            return False
        cells *= len(spans)
    return len({tuple(c["offsets"]) for c in chunks}) == len(chunks) == cells


_TAGS = frozenset({"dict", "tuple", "float", "bytes", "npscalar", "ndarray", "tensor", "dtensor"})


def numpy_dtype(text: object) -> np.dtype[Any]:
    """The numpy dtype of an ``ndarray``/``npscalar`` node (no Python objects, fields
    or sub-arrays: raw bytes of those would be pointers); `CorruptCheckpointError`."""
    try:
        return _numpy_dtype(text, "dtype")
    except _Invalid as e:
        raise CorruptCheckpointError(str(e)) from None


def _numpy_dtype(text: object, path: str) -> np.dtype[Any]:
    _require(isinstance(text, str) and len(text) <= 32, path, "not a numpy dtype")
    try:
        dtype: np.dtype[Any] = np.dtype(str(text))
    except Exception:  # whatever numpy's parser makes of untrusted text
        raise _Invalid(path, f"not a numpy dtype: {text!r}") from None
    _require(
        not dtype.hasobject
        and dtype.fields is None
        and dtype.subdtype is None
        and dtype.kind in "biufcmMSUV"
        and dtype.itemsize > 0
        and not (dtype.kind in "mM" and np.datetime_data(dtype)[0] == "generic"),
        path,
        f"numpy dtype {text!r} is not one of plain values",
    )
    return dtype


def valid_text(data: bytes | np.ndarray[Any, Any], dtype: np.dtype[Any]) -> bool:
    """Whether the bytes of a numpy unicode value (dtype kind ``U``) are code points
    (numpy fails on others in ways no error handler expects); True for other kinds."""
    if dtype.kind != "U":
        return True
    points = np.frombuffer(data, dtype=dtype.byteorder.replace("|", "=") + "u4")
    return bool(np.all(points <= 0x10FFFF))


def _shape(value: Any, path: str) -> list[int]:
    _require(
        isinstance(value, list)
        and len(value) <= MAX_DIMS
        and all(_is_int(d) and 0 <= d <= MAX_ELEMENTS for d in value)
        and math.prod(max(d, 1) for d in value) <= MAX_ELEMENTS,  # strides fit, even of 0
        path,
        "not a shape (a list of ints >= 0)",
    )
    return value  # type: ignore[no-any-return]


def check_metrics(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object of metrics (`_check_json`), else
    `CorruptCheckpointError` naming ``where``."""
    try:
        _require(isinstance(value, dict), "metrics", "not a JSON object")
        _check_json(value, "metrics", 0)
    except _Invalid as e:
        raise CorruptCheckpointError(f"{where}: {e}") from None
    return value  # type: ignore[no-any-return]


def check_steps(value: Any, where: str) -> set[int]:
    """``value`` as a set of steps if it is a JSON list of ints >= 0, else
    `CorruptCheckpointError` naming ``where``."""
    if not (isinstance(value, list) and all(_is_int(s) and s >= 0 for s in value)):
        raise CorruptCheckpointError(f"{where}: not a JSON list of steps")
    return set(value)


def _check_json(value: Any, path: str, depth: int) -> None:
    """Metrics and metadata: plain JSON, nested at most `MAX_DEPTH` deep."""
    _require(depth <= MAX_DEPTH, path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, child in value.items():
            _check_json(child, f"{path}/{key}", depth + 1)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            _check_json(child, f"{path}/{i}", depth + 1)
    elif isinstance(value, float):
        _require(math.isfinite(value), path, "a non-finite number")


def loads(data: bytes, where: str) -> Any:
    """Strict JSON (no NaN or Infinity) from an untrusted file; `CorruptCheckpointError`."""

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(data, parse_constant=reject)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where}: not readable JSON ({e})") from None


def _b64(text: str, path: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(path, "not base64") from None


def _is_torch_dtype(value: Any) -> bool:
    return isinstance(value, str) and value in TORCH_DTYPES


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def _require(condition: bool, path: str, problem: str) -> None:
    if not condition:
        raise _Invalid(path, problem)
