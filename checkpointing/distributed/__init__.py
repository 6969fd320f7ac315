"""Multi-process jobs: coordination over torch.distributed, sharded tensors (DTensor)."""

from typing import Any

from checkpointing.distributed.coordinator import TorchDistributed, default_coordinator

__all__ = ["ShardedOptimizer", "TorchDistributed", "default_coordinator"]


def __getattr__(name: str) -> Any:
    if name == "ShardedOptimizer":  # imports DCP's state_dict helpers: ~0.7 s, on demand
        from checkpointing.distributed.optimizer import ShardedOptimizer

        return ShardedOptimizer
    raise AttributeError(name)
