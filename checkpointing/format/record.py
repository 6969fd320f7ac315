"""The commit record: the one file that makes a step exist.

It is written last. It lists the items (their trees, with every non-tensor value), every
data file with its size and checksum, the metrics, user metadata and timestamps. A step
directory without a complete, parseable record is not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from checkpointing.errors import CorruptCheckpointError, InvalidOptionError

RECORD_NAME = "checkpoint.json"
FORMAT_NAME = "checkpointing"
FORMAT_VERSION = 1


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
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT_NAME,
            "version": self.version,
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
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Record:
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
                raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} commit record")
            if body["version"] > FORMAT_VERSION:
                raise CorruptCheckpointError(
                    f"{where}: format version {body['version']} is newer than this library "
                    f"reads ({FORMAT_VERSION}); upgrade checkpointing"
                )
            return cls(
                step=int(body["step"]),
                created_at=float(body["created_at"]),
                committed_at=float(body["committed_at"]),
                items=body["items"],
                files={name: FileInfo(**info) for name, info in body["files"].items()},
                metrics=body.get("metrics"),
                metadata=body.get("metadata"),
                version=int(body["version"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{where}: unreadable commit record ({e})") from e


def to_json_value(value: Any, what: str) -> Any:
    """Metrics and metadata as plain JSON: numbers from tensors/numpy become floats/ints.

    Non-finite floats become strings ("nan", "inf") so the record stays strict JSON.
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
        return value if math.isfinite(value) else repr(value)
    raise InvalidOptionError(
        f"{what} must hold numbers, strings, lists and dicts; got {type(value).__name__}"
    )
