"""The commit record: the one file that makes a step exist.

It is written last. It lists the items (their trees, with every non-tensor value), every
data file with its size and checksum, the metrics, user metadata and timestamps. A step
directory without a complete, parseable record is not a checkpoint.

The record checks itself: it is plain JSON whose first field is the xxh3-64 of the rest
(``{"checksum":"<16 hex>",`` then the record without that field, from its ``{``), so
a flipped bit anywhere in it is found before any of it is trusted; then its schema is
checked in full (`format.schema`). Version 1 records, written before the checksum,
are read without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xxhash

from checkpointing.errors import CorruptCheckpointError, InvalidOptionError, UnsupportedFormatError
from checkpointing.format import schema

RECORD_NAME = "checkpoint.json"
FORMAT_NAME = "checkpointing"
FORMAT_VERSION = 3  # the newest this library reads
# Version 3 adds references to files of earlier steps (an incremental save); a record
# without them is written as version 2, which readers of that version still read.
PLAIN_VERSION = 2
# A record holds structure, not tensors; parsing it costs memory by its size and by its
# number of lists and objects, so both are bounded (a legit record of 64 MiB, some
# 400,000 tensors, has under 2 million).
MAX_RECORD_BYTES = 64 << 20
MAX_CONTAINERS = 4_000_000
_CHECKSUM = re.compile(rb'\{"checksum":"([0-9a-f]{16})",')


@dataclasses.dataclass(frozen=True)
class FileInfo:
    size: int
    header_checksum: str
    checksum: str


@dataclasses.dataclass(frozen=True)
class Record:
    step: int
    created_at: float  # clock seconds when the save began
    committed_at: float  # clock seconds when the record was written
    items: dict[str, Any]  # item name -> tree (see format.tree)
    files: dict[str, FileInfo]
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # step -> its files that hold tensors of this one (an incremental save): the tree's
    # array nodes with a "step" field read from them
    references: dict[int, dict[str, FileInfo]] = dataclasses.field(default_factory=dict)
    version: int = PLAIN_VERSION

    def to_json(self) -> bytes:
        """The record's bytes, checksum first; `InvalidOptionError` if they would be too
        large to read back."""
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if self.references else self.version,
            "step": self.step,
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "checksum_algorithm": "xxh3_64",
            "torch_version": torch.__version__,
            "files": {name: dataclasses.asdict(info) for name, info in self.files.items()},
            "items": self.items,
        }
        if self.references:
            body["references"] = {
                str(step): {name: dataclasses.asdict(info) for name, info in files.items()}
                for step, files in sorted(self.references.items())
            }
        rest = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        data = b'{"checksum":"%s",%s' % (xxhash.xxh3_64_hexdigest(rest).encode(), rest[1:])
        if len(data) > MAX_RECORD_BYTES or _containers(data) > MAX_CONTAINERS:
            raise InvalidOptionError(
                f"the commit record of step {self.step} would be larger than a reader "
                f"accepts ({MAX_RECORD_BYTES} bytes, {MAX_CONTAINERS} lists and dicts): keep "
                f"large values in tensors or numpy arrays, not in Python containers"
            )
        return data

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Record:
        """Parse and check a record; `CorruptCheckpointError` naming ``where`` for any
        damage, `UnsupportedFormatError` for a newer format."""
        body = _parse(data, where)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptCheckpointError(f"{where}: commit record without a valid version")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where}: written in format version {version}, newer than this library "
                f"reads ({FORMAT_VERSION}); upgrade checkpointing to restore it"
            )
        if version >= 2 and not _CHECKSUM.match(data):
            raise CorruptCheckpointError(f"{where}: commit record without its checksum")
        schema.check_body(body, where, version=version)
        return cls(
            step=body["step"],
            created_at=float(body["created_at"]),
            committed_at=float(body["committed_at"]),
            items=body["items"],
            files={name: FileInfo(**info) for name, info in body["files"].items()},
            metrics=body.get("metrics"),
            metadata=body.get("metadata"),
            references={
                int(step): {name: FileInfo(**info) for name, info in files.items()}
                for step, files in body.get("references", {}).items()
            },
            version=version,
        )


def _parse(data: bytes, where: str) -> dict[str, Any]:
    """The record's JSON object, its checksum verified when it has one."""
    if len(data) > MAX_RECORD_BYTES or _containers(data) > MAX_CONTAINERS:
        raise CorruptCheckpointError(f"{where}: too large for a commit record")
    found = _CHECKSUM.match(data)
    if found is not None:
        data = b"{" + data[found.end() :]
        if xxhash.xxh3_64_hexdigest(data) != found.group(1).decode():
            raise CorruptCheckpointError(
                f"{where}: the commit record fails its checksum; it is damaged. Restore "
                f"another step (all_steps()) or a copy of this one"
            )
    body = schema.loads(data, where)
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} commit record")
    return body


def _containers(data: bytes) -> int:
    """An upper bound on the lists and objects in JSON ``data`` (brackets in strings
    count too), found without parsing it."""
    return data.count(b"[") + data.count(b"{")


_FLOAT = "$float"  # a non-finite float, which JSON lacks


def to_json_value(value: Any, what: str) -> Any:
    """Metrics and metadata as plain JSON: numbers from tensors/numpy become floats/ints.

    Non-finite floats become ``{"$float": "nan"}`` (or ``"inf"``, ``"-inf"``), so the
    record stays strict JSON and `from_json_value` gives the float back.
    """
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidOptionError(f"{what} keys must be str, got {k!r}")
            out[k] = to_json_value(v, what)
        return out
    if isinstance(value, list | tuple):
        return [to_json_value(v, what) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, torch.Tensor | np.generic | np.ndarray) and math.prod(value.shape) == 1:
        value = value.item()
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    raise InvalidOptionError(
        f"{what} must hold numbers, strings, lists and dicts; got {type(value).__name__}"
    )


def from_json_value(value: Any) -> Any:
    """Metrics or metadata as given to `save`: `to_json_value`'s non-finite floats back."""
    if isinstance(value, dict):
        if value.keys() == {_FLOAT} and value[_FLOAT] in ("nan", "inf", "-inf"):
            return float(value[_FLOAT])
        return {k: from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value
