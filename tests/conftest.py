"""Shared fixtures: small real models and a factory of managers on tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpointing import CheckpointManager, CheckpointManagerOptions


@pytest.fixture
def make_manager(tmp_path: Path) -> Iterator[Callable[..., CheckpointManager]]:
    """``make_manager(**options)`` opens a manager on ``tmp_path/ckpt``; all are closed after."""
    managers: list[CheckpointManager] = []

    def make(directory: Path | None = None, **options: Any) -> CheckpointManager:
        mgr = CheckpointManager(directory or tmp_path / "ckpt", CheckpointManagerOptions(**options))
        managers.append(mgr)
        return mgr

    yield make
    for mgr in managers:
        mgr.close()
