"""The path policy: which file names a checkpoint may use.

File names come from commit records, which are untrusted input (a checkpoint may come
from a shared bucket or a stranger). Before a name is joined to a directory it must be
a plain relative path that stays inside its step: components of letters, digits, ``_``,
``-`` and ``.`` (what this library writes), never ``.`` or ``..``, no separator but
``/``, no absolute path or drive, at most `MAX_DEPTH` components. Checking one narrow
alphabet in this one place is what keeps every reader and every copy (restore,
verify, sync, mirror, the download cache) from being steered outside the directory.
"""

from __future__ import annotations

import re

from checkpointing.errors import CorruptCheckpointError

MAX_DEPTH = 2  # "model.safetensors", "sharded/rank3.safetensors"
MAX_COMPONENT = 255  # bytes, the usual file system limit
_COMPONENT = re.compile(r"[A-Za-z0-9_.\-]+")


def is_safe_name(name: object) -> bool:
    """Whether ``name`` is a relative path this library could have written."""
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    return 0 < len(parts) <= MAX_DEPTH and all(
        len(part) <= MAX_COMPONENT
        and part not in (".", "..")
        and not part.startswith(".tmp-")  # what a writer's clean-up removes
        and _COMPONENT.fullmatch(part) is not None
        for part in parts
    )


def check_name(name: object, where: str) -> str:
    """``name`` if it is safe (`is_safe_name`); else `CorruptCheckpointError`."""
    if not is_safe_name(name):
        raise CorruptCheckpointError(
            f"{where}: refers to the file {name!r}, which is not a plain name inside the "
            f"step; refusing to use it (a damaged or crafted checkpoint)"
        )
    assert isinstance(name, str)
    return name
