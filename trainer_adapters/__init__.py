"""Adapters that plug `checkpointing.CheckpointManager` into existing trainers."""
