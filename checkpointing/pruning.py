"""Retention as mechanism: decide over the catalog (`policies.retention`), then delete.

The primary decides and deletes; in a distributed job the others follow its decision.
Steps pinned with ``protect()``, read by a restore of this manager, or leased by an
evaluation job are never deleted; a step leased while being deleted is kept too (the
deletion mark protocol of `leases`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from checkpointing import leases
from checkpointing.catalog import StepCatalog
from checkpointing.coordination import Coordinator, describe
from checkpointing.errors import CheckpointError
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.policies.retention import (
    CheckpointInfo,
    KeepBest,
    RetentionDecision,
    RetentionPolicy,
    best_rules_ranking_nothing,
    decide_retention,
)
from checkpointing.storage import Storage

logger = logging.getLogger("checkpointing")


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One line of `CheckpointManager.retention_report`.

    Attributes:
        step: The step.
        kept: Whether retention keeps it.
        reasons: The rules that keep it (``"latest 3"``, ``"protected"``, ...); empty
            when it is not kept.
        committed_at: When it was committed, in seconds of the manager's clock.
        nbytes: The size of its files.
        metrics: Its metrics as saved, updated by those recorded since; None if none.
        reads: The steps whose files hold some of its tensors (an incremental save);
            ``nbytes`` counts its own files only.
    """

    step: int
    kept: bool
    reasons: tuple[str, ...]
    committed_at: float
    nbytes: int
    metrics: dict[str, Any] | None  # saved with the step, updated by those recorded since
    reads: tuple[int, ...] = ()


class Pruner:
    def __init__(
        self,
        storage: Storage,
        catalog: StepCatalog,
        policy: RetentionPolicy | None,
        *,
        always_keep_latest: bool,
        clock: Callable[[], float],
    ) -> None:
        self._storage = storage
        self._catalog = catalog
        self._policy = policy
        self._always_keep_latest = always_keep_latest
        self._clock = clock
        self._warned: list[KeepBest] = []  # best-N rules said to rank nothing

    def decide(
        self, leased: Iterable[int] = (), extra: Mapping[int, Record] | None = None
    ) -> RetentionDecision:
        """What retention keeps of the committed steps (and of ``extra`` ones, as if
        they were committed: a mirror asks before uploading them)."""
        catalog = self._catalog
        records = {**catalog.records, **(extra or {})}
        infos = [
            CheckpointInfo(step, r.committed_at, catalog.metrics(step, r.metrics))
            for step, r in sorted(records.items())
        ]
        for rule in best_rules_ranking_nothing(self._policy, infos):
            # Only once it has to choose: an evaluator may not have scored the first ones.
            if rule not in self._warned and len(infos) > rule.n:
                self._warned.append(rule)
                seen = sorted((infos[-1].metrics or {}).keys())
                by = repr(rule.metric) if isinstance(rule.metric, str) else "best_fn"
                logger.warning(
                    "retention keeps the best %d by %s, yet none of the %d steps has a "
                    "finite number there (metrics of the newest: %s); the other rules "
                    "decide alone. Check best_metric / best_fn, or that the evaluation job "
                    "records it (record_metrics)",
                    rule.n,
                    by,
                    len(infos),
                    seen or "none",
                )
        return decide_retention(
            infos,
            self._policy,
            now=self._clock(),
            protected=catalog.protected,
            in_progress={*catalog.being_read, *leased},
            always_keep_latest=self._always_keep_latest,
            references={step: set(r.references) for step, r in records.items()},
        )

    def report(self, leased: Iterable[int] = ()) -> list[StepReport]:
        """For every listed step: kept or not, and by which rule(s) (``leased``: steps
        evaluation jobs hold, which retention keeps too)."""
        decision = self.decide(leased)
        return [
            StepReport(
                step=step,
                kept=step in decision.keep,
                reasons=decision.keep.get(step, ()),
                committed_at=record.committed_at,
                nbytes=sum(f.size for f in record.files.values()),
                metrics=self._catalog.metrics(step, record.metrics),
                reads=tuple(sorted(record.references)),
            )
            for step, record in self._catalog.listed().items()
        ]

    def apply(self, coordinator: Coordinator, *, held: bool = False) -> list[int]:
        """Delete what no rule keeps; return the steps deleted. ``held``: by an async
        save of a distributed job, whose deletes stay listed until its join."""
        if self._policy is None:
            return []
        catalog = self._catalog
        deleted: list[int] = []
        error: Exception | None = None
        if coordinator.is_primary:
            try:
                catalog.refresh_evaluator_metrics()
                leased = leases.leased_steps(self._storage, time.time())  # leases: wall time
                with catalog.lock:
                    # Newest first: a step goes before the steps whose files it reads
                    # (incremental saves), so no crash can leave it without them.
                    still_read: set[int] = set()
                    for step in sorted(self.decide(leased).delete, reverse=True):
                        if step in still_read:
                            continue
                        with leases.deleting(self._storage, step) as free:
                            if not free:
                                logger.info("step %d kept: an evaluation job leased it", step)
                                still_read |= _read_by(step, catalog.records)
                                continue
                            logger.info("retention deletes step %d", step)
                            self._storage.delete(catalog.folder(step), RECORD_NAME)
                            catalog.forget([step], held=held)
                            deleted.append(step)
            except Exception as e:
                error = e
        if coordinator.world_size > 1:
            deleted, failure = coordinator.broadcast((deleted, describe(error)))
            with catalog.lock:
                catalog.forget(deleted, held=held)
            if failure is not None and error is None:
                raise CheckpointError(f"retention failed on the primary: {failure}")
        if error is not None:
            raise error
        return deleted


def _read_by(step: int, records: Mapping[int, Record]) -> set[int]:
    """The steps whose files ``step`` reads, directly or through them."""
    found: set[int] = set()
    todo = [step]
    while todo:
        record = records.get(todo.pop())
        for origin in set(record.references) - found if record else ():
            found.add(origin)
            todo.append(origin)
    return found
