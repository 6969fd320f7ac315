"""Multi-process jobs: coordination over torch.distributed and sharded tensors via DCP."""

from checkpointing.distributed.coordinator import TorchDistributed, default_coordinator

__all__ = ["TorchDistributed", "default_coordinator"]
