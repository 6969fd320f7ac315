"""`ShardedOptimizer`: an optimizer of an FSDP2 / tensor-parallel model, as an item.

An optimizer's own ``state_dict()`` keys its state by parameter index and has no state
before its first step, so a fresh optimizer offers nothing to load shards into.
torch.distributed.checkpoint's ``get/set_optimizer_state_dict`` key it by parameter name
and create the state first: this wrapper gives the manager that view.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


class ShardedOptimizer:
    """Save ``{"model": model, "optimizer": ShardedOptimizer(model, optimizer)}``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
