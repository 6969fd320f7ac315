"""Small real training states shared by tests."""

from __future__ import annotations

from typing import Any

import torch


def tiny_training_state(seed: int = 0) -> dict[str, Any]:
    """A model, its AdamW state after one step, and a scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return {"model": model, "optimizer": opt, "scheduler": sched, "extra": {"epoch": 3}}
