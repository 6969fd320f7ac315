"""checkpointing: a crash-safe, pickle-free checkpoint manager for PyTorch.

Three lines::

    from checkpointing import CheckpointManager, CheckpointManagerOptions
    with CheckpointManager("runs/exp1/ckpt", CheckpointManagerOptions(max_to_keep=3)) as mgr:
        mgr.restore(state, missing_ok=True)
        ...
        mgr.save(step, state, metrics={"loss": loss})
"""

from checkpointing.coordination import Coordinator, PerRank, SingleProcess
from checkpointing.distributed import TorchDistributed
from checkpointing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
    DirectoryLockedError,
    DiskFullError,
    InvalidOptionError,
    ItemNotFoundError,
    PartialRestoreError,
    ReadOnlyError,
    RemoteBehindError,
    RemoteStorageError,
    RemoteUnavailableError,
    StepAlreadyExistsError,
    StepOrderError,
    TargetMismatchError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from checkpointing.format.naming import (
    EpochIterNaming,
    PrefixNaming,
    StepNaming,
    checkpoint_n_naming,
)
from checkpointing.format.plain import load_file
from checkpointing.manager import CheckpointManager, checkpoints_iterator, wait_for_new_checkpoint
from checkpointing.options import CheckpointManagerOptions
from checkpointing.policies import (
    AnyOf,
    AtSteps,
    CheckpointInfo,
    Continuous,
    EveryNSeconds,
    EveryNSteps,
    InitialSave,
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    KeepNewerThan,
    KeepSteps,
    OnPreemption,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)
from checkpointing.pruning import StepReport
from checkpointing.restoring import TensorMetadata
from checkpointing.saving import SaveStats

__version__ = "0.1.0"

__all__ = [
    "AnyOf",
    "AtSteps",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointNotFoundError",
    "Continuous",
    "CoordinationError",
    "Coordinator",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "DiskFullError",
    "EpochIterNaming",
    "EveryNSeconds",
    "EveryNSteps",
    "InitialSave",
    "InvalidOptionError",
    "ItemNotFoundError",
    "KeepAnyOf",
    "KeepBest",
    "KeepEveryNSeconds",
    "KeepEveryNSteps",
    "KeepLatest",
    "KeepNewerThan",
    "KeepSteps",
    "OnPreemption",
    "PartialRestoreError",
    "PerRank",
    "PrefixNaming",
    "ReadOnlyError",
    "RemoteBehindError",
    "RemoteStorageError",
    "RemoteUnavailableError",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "SaveStats",
    "SingleProcess",
    "StepAlreadyExistsError",
    "StepNaming",
    "StepOrderError",
    "StepReport",
    "TargetMismatchError",
    "TensorMetadata",
    "TorchDistributed",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "checkpoint_n_naming",
    "checkpoints_iterator",
    "load_file",
    "wait_for_new_checkpoint",
]
