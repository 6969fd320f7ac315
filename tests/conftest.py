"""Shared fixtures: small real models and a factory of managers on tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

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


def tiny_training_state(seed: int = 0) -> dict[str, Any]:
    """A model, its AdamW state after one step, and a scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return {"model": model, "optimizer": opt, "scheduler": sched, "extra": {"epoch": 3}}
