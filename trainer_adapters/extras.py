"""Optional frameworks: an adapter imports its framework through `require`, so a missing
one is an error that names the extra to install instead of a bare ``ModuleNotFoundError``."""

from __future__ import annotations

import importlib
from types import ModuleType

from checkpointing.storage.remote import DISTRIBUTION


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise ImportError saying ``pip install 'DIST[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed: pip install '{DISTRIBUTION}[{extra}]'"
        ) from e
