"""The step catalog: what a checkpoint directory holds, as this manager knows it.

It keeps the commit records of the committed steps (so `latest_step()` and `all_steps()`
cost nothing), the folder each step was found in, the steps whose record cannot be used,
the steps `protect()` pinned, and the metrics evaluation jobs recorded. `scan` reads all
of that from the directory (the primary's job: in a distributed job the others take its
scan); the catalog is then kept current as this manager saves, deletes and protects.

Everything read here is untrusted: records are checked in full (`format.record`), and
the bookkeeping files (``protected.json``, ``recorded_metrics.json``) just as strictly.

**Held changes.** In a job of several processes, every process must list the same steps
at the same point of its program, or code that branches on ``latest_step()`` takes
different branches on different processes and hangs in a collective. An async save's
background thread commits and deletes whenever it finishes, which differs by process.
So what it changes is *held*: a step it commits is not listed yet, and a step it deletes
still is, until the training thread waits for that save (`release_held`), which every
process does at the same call of its program. Decisions that must see every commit (the
save policy, retention) read `records`; listings read `listed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from checkpointing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidOptionError,
    RemoteStorageError,
    UnsupportedFormatError,
)
from checkpointing.format import schema
from checkpointing.format.naming import ReaderNaming, StepNaming
from checkpointing.format.record import MAX_RECORD_BYTES, RECORD_NAME, Record, from_json_value
from checkpointing.storage import Storage

logger = logging.getLogger("checkpointing")

PROTECTED_NAME = "protected.json"
EVALUATOR_METRICS_NAME = "recorded_metrics.json"
_MAX_BOOKKEEPING_BYTES = 16 << 20


@dataclasses.dataclass
class Scan:
    """What a directory holds (see `StepCatalog.scan`)."""

    records: dict[int, Record]
    versions: dict[int, str]  # step -> the version of its record file (`Storage.committed`)
    folders: dict[int, str]  # step -> its folder's name, unreadable steps included
    unreadable: dict[int, CheckpointError]  # step -> why its record cannot be used
    protected: set[int]
    evaluator_metrics: dict[int, dict[str, Any]]
    # committed folders this naming does not list, though a reader's finds them
    # (`format.naming.ReaderNaming`): bare numbers, ``checkpoint_<n>``
    named_otherwise: list[str] = dataclasses.field(default_factory=list)


class StepCatalog:
    """The steps of one directory. Attributes are replaced, never mutated, so readers on
    other threads need no lock; writers hold `lock`, which also keeps retention from
    deleting a step that a restore is `reading`."""

    def __init__(
        self, storage: Storage, naming: StepNaming, *, primary: bool, read_only: bool
    ) -> None:
        self._storage = storage
        self._naming = naming
        self._primary = primary  # writes the bookkeeping files
        self._read_only = read_only
        self.lock = threading.Lock()
        self._records: dict[int, Record] = {}
        self._versions: dict[int, str] = {}  # of records as read; not of this manager's saves
        self._folders: dict[int, str] = {}
        self._unreadable: dict[int, CheckpointError] = {}
        self._protected: frozenset[int] = frozenset()
        self._evaluator_metrics: dict[int, dict[str, Any]] = {}
        self._held_back: frozenset[int] = frozenset()  # committed, listed from the join
        self._held_listed: dict[int, Record] = {}  # deleted, listed until the join
        self._reading: dict[int, int] = {}  # step -> restores reading it
        self._named_otherwise: list[str] = []  # see `Scan.named_otherwise`

    # ------------------------------------------------------------------ reading

    def scan(self) -> Scan:
        """Read the directory: every step folder's record (those already known are read
        again only if their file changed), the protected steps and the evaluators'
        metrics."""
        scan = Scan({}, {}, {}, {}, self._load_protected(), self.load_evaluator_metrics())
        names = self._storage.committed(RECORD_NAME)
        found = [(step, n) for n in names if (step := self._naming.parse(n)) is not None]
        listed = {n for _, n in found}
        reader = ReaderNaming(self._naming)
        otherwise = {n: s for n in names if n not in listed and (s := reader.parse(n)) is not None}
        scan.named_otherwise = sorted(otherwise, key=otherwise.__getitem__)
        # Where two folders hold one step (step_5 and step_00000005), today's name wins.
        found.sort(key=lambda s_n: (s_n[0], s_n[1] != self._naming.name(s_n[0]), s_n[1]))
        for step, name in found:
            if step in scan.folders:
                where = f"{self._storage.url}/{name}"
                logger.warning("ignoring %s: step %d has another folder", where, step)
                continue
            known = self._records.get(step)
            try:
                if known is None or self._versions.get(step) != names[name]:
                    known = self._read_record(name, step)
            except FileNotFoundError:  # deleted by another process since the listing
                continue
            except RemoteStorageError:
                raise  # the store failed, not the record
            except (OSError, CorruptCheckpointError, UnsupportedFormatError) as e:
                if isinstance(e, OSError):  # permissions, a socket where the record is
                    e = CorruptCheckpointError(f"{self._storage.url}/{name}: {e}")
                logger.warning("step %d cannot be read: %s", step, e)
                scan.unreadable[step] = e
            else:
                scan.records[step], scan.versions[step] = known, names[name]
            scan.folders[step] = name
        scan.records = dict(sorted(scan.records.items()))
        return scan

    def load(self, scan: Scan) -> None:
        """Take ``scan`` as what the directory holds."""
        with self.lock:
            self._records = scan.records
            self._versions = scan.versions
            self._folders = scan.folders
            self._unreadable = scan.unreadable
            self._protected = frozenset(scan.protected)
            self._evaluator_metrics = scan.evaluator_metrics
            self._named_otherwise = scan.named_otherwise

    def _read_record(self, name: str, step: int) -> Record:
        """The record in folder ``name``, which must be of ``step``."""
        path = f"{name}/{RECORD_NAME}"
        where = f"{self._storage.url}/{path}"
        record = Record.from_json(self._storage.read_bytes(path, MAX_RECORD_BYTES), where)
        if record.step != step:
            raise CorruptCheckpointError(
                f"{where}: the record is of step {record.step}, its folder of step {step}; "
                f"was the folder renamed? Rename it back"
            )
        return record

    def reread(self, step: int) -> Record | None:
        """The record of ``step`` read again, if it changed since it was listed (its run
        was deleted and re-created at the same place); None if it did not."""
        try:
            fresh = self._read_record(self.folder(step), step)
        except (OSError, CheckpointError):
            return None
        if fresh == self._records.get(step):
            return None
        with self.lock:
            self._records = {**self._records, step: fresh}
        return fresh

    @property
    def records(self) -> dict[int, Record]:
        """Every committed step this manager knows of, held or not, ascending."""
        return self._records

    def listed(self) -> dict[int, Record]:
        """The committed steps listings show (see held changes above), ascending."""
        records = self._records  # first: writers set the held changes before it
        held_back, held_listed = self._held_back, self._held_listed
        if not (held_back or held_listed):
            return records
        shown = {s: r for s, r in records.items() if s not in held_back}
        return dict(sorted({**shown, **held_listed}.items()))

    def record(self, step: int) -> Record | None:
        """The record of ``step`` if it is committed here (or deleted but still listed)."""
        return self._records.get(step) or self._held_listed.get(step)

    def folder(self, step: int) -> str:
        """The folder of ``step``: as found (an earlier ``step_format_fixed_length`` may
        have padded it otherwise), or as this manager names new steps."""
        return self._folders.get(step) or self._naming.name(step)

    @property
    def unreadable(self) -> dict[int, CheckpointError]:
        """Steps whose folder holds a record that cannot be used: damaged, of a newer
        format, or of another step."""
        return self._unreadable

    def refuse_named_otherwise(self) -> None:
        """Raise if the directory holds committed steps in folders this naming does not
        list: a writer would resume from scratch beside them, and never prune them."""
        names = self._named_otherwise
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise InvalidOptionError(
                f"{self._storage.url} holds checkpoints in folders named otherwise than "
                f"this manager names steps ({self._naming.name(0)!r} for step 0): {shown}. "
                f"Open it with the options that wrote them (step_prefix=None for bare "
                f"numbers, step_naming=checkpoint_n_naming() for checkpoint_<n>), or use "
                f"another directory"
            )

    def refuse_unreadable(self, step: int | None, *, latest: bool) -> None:
        """Raise if ``step`` is unreadable or, restoring the ``latest``, if a newer step
        is: resuming from an older step, or from scratch, must be the user's choice."""
        if step in self._unreadable:
            error = self._unreadable[step]
            raise type(error)(str(error))
        newer = [s for s in self._unreadable if latest and (step is None or s > step)]
        if newer:
            newest = max(newer)
            error = self._unreadable[newest]
            fix = (
                f"To resume from the newest readable step, restore(step={step}); or delete"
                if step is not None
                else "No older step is readable; delete"
            )
            raise type(error)(
                f"the newest step, {newest}, cannot be read: {error}. {fix}({newest}) (or "
                f"move its folder away) so that it no longer comes first"
            )

    # ------------------------------------------------------------------ changes

    def add(self, step: int, record: Record, *, held: bool = False) -> None:
        """A step committed (or downloaded) into this directory; ``held``: by an async
        save of a distributed job, listed from its join."""
        with self.lock:
            if held:  # before _records: `listed` reads without the lock
                self._held_back = self._held_back | {step}
            self._records = dict(sorted({**self._records, step: record}.items()))

    def forget(self, steps: Iterable[int], *, held: bool = False) -> None:
        """Deleted steps; ``held``: by an async save of a distributed job, listed until
        its join. Call with `lock` held."""
        gone = set(steps)
        if held:  # before _records, as in `add`
            listed = {s: r for s, r in self._records.items() if s in gone}
            self._held_listed = {**self._held_listed, **listed}
        self._records = {s: r for s, r in self._records.items() if s not in gone}
        self._folders = {s: n for s, n in self._folders.items() if s not in gone}
        self._unreadable = {s: e for s, e in self._unreadable.items() if s not in gone}

    def release_held(self) -> None:
        """The training thread joined the async save: list what it changed."""
        with self.lock:
            self._held_back, self._held_listed = frozenset(), {}

    @contextlib.contextmanager
    def reading(self, step: int) -> Iterator[None]:
        """Keep this manager's retention away from ``step`` during the block."""
        with self.lock:
            self._reading[step] = self._reading.get(step, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self._reading[step] -= 1
                if not self._reading[step]:
                    del self._reading[step]

    @property
    def being_read(self) -> set[int]:
        return set(self._reading)

    # -------------------------------------------------------------- protections

    @property
    def protected(self) -> frozenset[int]:
        return self._protected

    def set_protected(self, step: int, protected: bool) -> None:
        """Pin or unpin ``step``, persisted in the directory (by the primary)."""
        steps = self._protected | {step} if protected else self._protected - {step}
        if self._primary and steps != self._protected:
            self._storage.write_bytes(PROTECTED_NAME, json.dumps(sorted(steps)).encode())
        self._protected = steps

    def _load_protected(self) -> set[int]:
        """The protected steps. A damaged file stops a writer (it could otherwise delete
        a step the user pinned) and is ignored by readers."""
        where = f"{self._storage.url}/{PROTECTED_NAME}"
        try:
            data = self._storage.read_bytes(PROTECTED_NAME, _MAX_BOOKKEEPING_BYTES)
            return schema.check_steps(schema.loads(data, where), where)
        except FileNotFoundError:
            return set()
        except RemoteStorageError:
            raise
        except (OSError, CorruptCheckpointError) as e:
            if not self._read_only:
                raise CorruptCheckpointError(
                    f"{e}. It lists the steps protect() pinned; write the list again "
                    f"(e.g. [] for none) or delete the file, then reopen"
                ) from None
            logger.warning("ignoring %s", e)
            return set()

    # --------------------------------------------------------- evaluator metrics

    @property
    def evaluator_metrics(self) -> dict[int, dict[str, Any]]:
        """The metrics evaluation jobs recorded, by step (as last read)."""
        return self._evaluator_metrics

    def metrics(self, step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        """The metrics ``saved`` with ``step``, updated by those evaluation jobs recorded."""
        recorded = self._evaluator_metrics.get(step)
        merged: dict[str, Any] | None = from_json_value(
            saved if recorded is None else {**(saved or {}), **recorded}
        )
        return merged

    def load_evaluator_metrics(self) -> dict[int, dict[str, Any]]:
        """The metrics evaluation jobs recorded, by step; damaged files are skipped
        (logged)."""
        found = {}
        for name in self._storage.committed(EVALUATOR_METRICS_NAME):
            step = self._naming.parse(name)
            if step is None:
                continue
            path = f"{name}/{EVALUATOR_METRICS_NAME}"
            where = f"{self._storage.url}/{path}"
            try:
                data = self._storage.read_bytes(path, _MAX_BOOKKEEPING_BYTES)
                found[step] = schema.check_metrics(schema.loads(data, where), where)
            except FileNotFoundError:
                continue
            except RemoteStorageError:
                raise
            except (OSError, CorruptCheckpointError) as e:
                logger.warning("ignoring evaluator metrics: %s", e)
        return found

    def refresh_evaluator_metrics(self) -> None:
        """Read the evaluators' metrics again (retention ranks by them)."""
        self._evaluator_metrics = self.load_evaluator_metrics()

    def carry_metrics(self, source: StepCatalog) -> None:
        """Record here what evaluation jobs recorded in ``source``, for the steps both
        have (a copy's or a mirror's ranking is then the original's)."""
        for step, metrics in source.evaluator_metrics.items():
            recorded = self._evaluator_metrics.get(step, {})
            if step in self._records and {**recorded, **metrics} != recorded:
                self.record_metrics(step, metrics)

    def record_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write ``metrics`` (plain JSON) for ``step`` beside it, merged with those
        recorded before; never creating the step's folder again if it was deleted."""
        name = self.folder(step)
        merged = {**self._evaluator_metrics.get(step, {}), **metrics}
        gone = CheckpointNotFoundError(
            f"step {step} was deleted from {self._storage.url} meanwhile; its metrics were "
            f"not recorded"
        )
        if not self._storage.exists(f"{name}/{RECORD_NAME}"):
            raise gone
        try:
            self._storage.write_bytes(
                f"{name}/{EVALUATOR_METRICS_NAME}", json.dumps(merged).encode()
            )
        except FileNotFoundError:
            raise gone from None
        self._evaluator_metrics = {**self._evaluator_metrics, step: merged}
