"""Pure save, retention and preemption policies: plain data in, decisions out."""

from checkpointing.policies.preemption import PreemptionWatcher
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
    retention_policy_from_options,
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
    save_policy_from_options,
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
    "PreemptionWatcher",
    "RetentionDecision",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "decide_retention",
    "decide_save",
    "retention_policy_from_options",
    "save_policy_from_options",
]
