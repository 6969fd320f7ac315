"""Pure save and retention policies: plain data in, decisions out."""

from checkpointing.policies.retention import (
    CheckpointInfo,
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    KeepSteps,
    RetentionDecision,
    RetentionPolicy,
    decide_retention,
)
from checkpointing.policies.save import (
    AnyOf,
    AtSteps,
    EveryNSeconds,
    EveryNSteps,
    InitialSave,
    OnPreemption,
    SaveContext,
    SavePolicy,
    decide_save,
)

__all__ = [
    "AnyOf",
    "AtSteps",
    "CheckpointInfo",
    "EveryNSeconds",
    "EveryNSteps",
    "InitialSave",
    "KeepAnyOf",
    "KeepBest",
    "KeepEveryNSeconds",
    "KeepEveryNSteps",
    "KeepLatest",
    "KeepSteps",
    "OnPreemption",
    "RetentionDecision",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "decide_retention",
    "decide_save",
]
