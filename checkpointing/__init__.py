"""checkpointing: a crash-safe, pickle-free checkpoint manager for PyTorch.

Three lines::

    from checkpointing import CheckpointManager, CheckpointManagerOptions
    with CheckpointManager("runs/exp1/ckpt", CheckpointManagerOptions(max_to_keep=3)) as mgr:
        mgr.restore(state, missing_ok=True)
        ...
        mgr.save(step, state, metrics={"loss": loss})

Names are imported on first use, so that ``import checkpointing.errors`` and the
``checkpointing`` command's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# module -> the public names it provides
_EXPORTS: dict[str, tuple[str, ...]] = {
    "checkpointing.coordination": ("Coordinator", "PerRank", "SingleProcess", "TensorChannel"),
    "checkpointing.distributed": ("TorchDistributed",),
    "checkpointing.errors": (
        "CheckpointError",
        "CheckpointNotFoundError",
        "CoordinationError",
        "CorruptCheckpointError",
        "DirectoryLockedError",
        "DiskFullError",
        "InvalidOptionError",
        "ItemNotFoundError",
        "PartialRestoreError",
        "ReadOnlyError",
        "RemoteBehindError",
        "RemoteStorageError",
        "RemoteUnavailableError",
        "StepAlreadyExistsError",
        "StepOrderError",
        "TargetMismatchError",
        "UnsupportedFormatError",
        "UnsupportedTypeError",
    ),
    "checkpointing.format.naming": (
        "EpochIterNaming",
        "PrefixNaming",
        "StepNaming",
        "checkpoint_n_naming",
    ),
    "checkpointing.format.plain": ("load_file",),
    "checkpointing.manager": (
        "CheckpointManager",
        "checkpoints_iterator",
        "wait_for_new_checkpoint",
    ),
    "checkpointing.options": ("CheckpointManagerOptions",),
    "checkpointing.policies": (
        "AnyOf",
        "AtSteps",
        "CheckpointInfo",
        "Continuous",
        "EveryNSeconds",
        "EveryNSteps",
        "InitialSave",
        "KeepAnyOf",
        "KeepBest",
        "KeepEveryNSeconds",
        "KeepEveryNSteps",
        "KeepLatest",
        "KeepNewerThan",
        "KeepSteps",
        "OnPreemption",
        "RetentionPolicy",
        "SaveContext",
        "SavePolicy",
    ),
    "checkpointing.pruning": ("StepReport",),
    "checkpointing.remote_tier": ("MirrorStatus",),
    "checkpointing.restoring": ("TensorMetadata",),
    "checkpointing.saving": ("SaveStats",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from checkpointing.coordination import (
        Coordinator as Coordinator,
        PerRank as PerRank,
        SingleProcess as SingleProcess,
        TensorChannel as TensorChannel,
    )
    from checkpointing.distributed import (
        TorchDistributed as TorchDistributed,
    )
    from checkpointing.errors import (
        CheckpointError as CheckpointError,
        CheckpointNotFoundError as CheckpointNotFoundError,
        CoordinationError as CoordinationError,
        CorruptCheckpointError as CorruptCheckpointError,
        DirectoryLockedError as DirectoryLockedError,
        DiskFullError as DiskFullError,
        InvalidOptionError as InvalidOptionError,
        ItemNotFoundError as ItemNotFoundError,
        PartialRestoreError as PartialRestoreError,
        ReadOnlyError as ReadOnlyError,
        RemoteBehindError as RemoteBehindError,
        RemoteStorageError as RemoteStorageError,
        RemoteUnavailableError as RemoteUnavailableError,
        StepAlreadyExistsError as StepAlreadyExistsError,
        StepOrderError as StepOrderError,
        TargetMismatchError as TargetMismatchError,
        UnsupportedFormatError as UnsupportedFormatError,
        UnsupportedTypeError as UnsupportedTypeError,
    )
    from checkpointing.format.naming import (
        EpochIterNaming as EpochIterNaming,
        PrefixNaming as PrefixNaming,
        StepNaming as StepNaming,
        checkpoint_n_naming as checkpoint_n_naming,
    )
    from checkpointing.format.plain import (
        load_file as load_file,
    )
    from checkpointing.manager import (
        CheckpointManager as CheckpointManager,
        checkpoints_iterator as checkpoints_iterator,
        wait_for_new_checkpoint as wait_for_new_checkpoint,
    )
    from checkpointing.options import (
        CheckpointManagerOptions as CheckpointManagerOptions,
    )
    from checkpointing.policies import (
        AnyOf as AnyOf,
        AtSteps as AtSteps,
        CheckpointInfo as CheckpointInfo,
        Continuous as Continuous,
        EveryNSeconds as EveryNSeconds,
        EveryNSteps as EveryNSteps,
        InitialSave as InitialSave,
        KeepAnyOf as KeepAnyOf,
        KeepBest as KeepBest,
        KeepEveryNSeconds as KeepEveryNSeconds,
        KeepEveryNSteps as KeepEveryNSteps,
        KeepLatest as KeepLatest,
        KeepNewerThan as KeepNewerThan,
        KeepSteps as KeepSteps,
        OnPreemption as OnPreemption,
        RetentionPolicy as RetentionPolicy,
        SaveContext as SaveContext,
        SavePolicy as SavePolicy,
    )
    from checkpointing.pruning import (
        StepReport as StepReport,
    )
    from checkpointing.remote_tier import (
        MirrorStatus as MirrorStatus,
    )
    from checkpointing.restoring import (
        TensorMetadata as TensorMetadata,
    )
    from checkpointing.saving import (
        SaveStats as SaveStats,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'checkpointing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = sorted(_MODULE_OF)
