"""Storage backends. The manager reaches files only through `Storage`."""

from checkpointing.storage.base import StepWriter, Storage
from checkpointing.storage.local import LocalStorage

__all__ = ["LocalStorage", "StepWriter", "Storage"]
