"""The remote tier of a mirrored manager: a background copy that never costs the local one.

Saves commit on local disk at disk speed, whatever the remote does. A sync thread then
brings the remote in line, one *pass* at a time: it takes the remote directory's writer
lease (one writer there too), uploads every local step the remote lacks (the commit
record last, so a half-uploaded step stays invisible and the next pass redoes it),
carries `protect()` and the evaluators' metrics over, and applies the remote tier's own
retention, which honours the remote's protections, reader leases and recorded metrics
(`pruning`). A step that retention would delete at once is never uploaded; the steps an
incremental save reads are uploaded before it.

A pass that fails (the network, the store, a second writer) is retried with backoff;
nothing is raised into the training loop. `status` shows what the remote lacks and the
last error; `wait` (from `wait_until_finished`) runs a pass now and raises
`RemoteBehindError` if the remote is still behind. Steps not uploaded when a job dies
are uploaded by the first pass of the next manager opened on that local directory.

`NoRemote` stands in when there is no remote, so the manager never asks whether there
is one. In a job of several processes the primary alone syncs; at each save it
broadcasts what changed in its remote listing (usually one step), and every process
lists that from the save's join, like the local tier's held changes (`catalog`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import filelock

from checkpointing.catalog import StepCatalog
from checkpointing.coordination import Coordinator, SingleProcess
from checkpointing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    RemoteBehindError,
)
from checkpointing.format.naming import StepNaming
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.policies.retention import RetentionPolicy
from checkpointing.pruning import Pruner
from checkpointing.storage import FsspecStorage, LocalStorage, Storage, open_storage
from checkpointing.storage.transfer import copy_step

logger = logging.getLogger("checkpointing")

RETRY_SECS = 30.0  # per request: a failed pass is retried as a whole anyway
MAX_BACKOFF_SECS = 60.0
CLOSE_WAIT_SECS = 5.0  # for a pass against a failing remote, at close


@dataclasses.dataclass(frozen=True)
class MirrorStatus:
    """Where a mirror stands (`CheckpointManager.mirror_status`): what a job's health
    check or dashboard looks at to tell a mirror that keeps up from one that fails.

    Attributes:
        url: The remote directory.
        remote_steps: The steps committed on the remote.
        behind: The steps committed locally and not on the remote yet.
        last_error: Why the last upload pass or listing failed; None once one succeeded.
        failing_since: Wall-clock time of the first failure in a row; None when the last
            pass succeeded.
        synced_at: Wall-clock time the last pass succeeded; None before one did.
    """

    url: str
    remote_steps: tuple[int, ...]
    behind: tuple[int, ...]
    last_error: str | None
    failing_since: float | None
    synced_at: float | None


class NoRemote:
    """No remote tier: nothing listed, nothing to upload, wait for or delete."""

    def reload(self) -> dict[int, Record]:
        """List the remote steps (the primary, in a distributed job); return them."""
        return {}

    def load(self, records: dict[int, Record]) -> None:
        """Take ``records`` (the primary's listing) as the remote steps."""

    def listed(self) -> dict[int, Record]:
        """The remote steps listings show."""
        return {}

    def known(self) -> dict[int, Record]:
        """Every remote step this process knows of, listed or not."""
        return {}

    @property
    def listing_error(self) -> str | None:
        """Why the remote could not be listed when the manager opened, if it could not."""
        return None

    def start(self) -> None:
        """The manager is open: bring the remote in line (uploads left by a dead job)."""

    def after_commit(self, coordinator: Coordinator, *, held: bool) -> None:
        """A step was committed locally: agree on the remote listing across processes
        (``held``: listed from the save's join) and sync (on the primary)."""

    def release_held(self) -> None:
        """The save was joined: list the remote steps agreed at its commit."""

    def metrics(self, step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        """The metrics ``saved`` with a remote step, updated by those recorded for it."""
        return saved

    def location(self, step: int) -> tuple[Storage, str]:
        """The storage and folder of a remote step."""
        raise CheckpointNotFoundError(f"step {step} has no remote copy")

    def copy_into(self, step: int, record: Record, local: LocalStorage, folder: str) -> None:
        """Download a remote step into ``folder`` of the local directory, once per node."""
        raise CheckpointNotFoundError(f"step {step} has no remote copy")

    def reread(self, step: int) -> Record | None:
        """The step's record read again from the remote, if it changed (a run deleted and
        re-created at the same URL); None if it did not."""
        return None

    def reading(self, step: int) -> contextlib.AbstractContextManager[object]:
        """Keep the remote tier's retention away from ``step`` during the block."""
        return contextlib.nullcontext()

    def delete(self, step: int) -> None:
        """Delete a remote step (the primary, in the background); stop listing it."""

    def set_protected(self, step: int, protected: bool) -> None:
        """Carry `protect` / `unprotect` over to the remote."""

    def wait(self) -> None:
        """Run a pass now; `RemoteBehindError` if the remote still lacks steps."""

    def status(self) -> MirrorStatus | None:
        return None

    def close(self) -> None:
        """Finish syncing while the remote answers, then stop; never raises."""


class Mirror(NoRemote):
    """A remote copy of the local directory (``remote=`` of the manager)."""

    def __init__(
        self,
        url: str,
        *,
        local: Storage,
        local_catalog: StepCatalog,
        storage_options: dict[str, Any] | None,
        retention: RetentionPolicy | None,
        naming: StepNaming,
        coordinator: Coordinator,
        always_keep_latest: bool,
        lease_secs: float,
        clock: Callable[[], float],
    ) -> None:
        # Nothing touches the remote before the sync thread's first pass.
        self.storage = open_storage(
            url, create=False, storage_options=storage_options, lease_secs=lease_secs
        )
        if isinstance(self.storage, FsspecStorage):
            self.storage.retry_secs = RETRY_SECS
        self._local = local
        self._local_catalog = local_catalog
        self._naming = naming
        self._primary = coordinator.is_primary
        self._distributed = coordinator.world_size > 1
        self.catalog = StepCatalog(self.storage, naming, primary=True, read_only=False)
        self._pruner = Pruner(
            self.storage,
            self.catalog,
            retention,
            always_keep_latest=always_keep_latest,
            clock=clock,
        )
        self._view: dict[int, Record] = {}  # a non-primary's: what the primary told it
        self._listed: dict[int, Record] = {}  # as listings show it (distributed jobs)
        self._agreed: dict[int, Record] | None = None  # at a save not joined yet
        self._listing_error: str | None = None
        # The sync thread's state, under `_cond`.
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._asked = 0  # passes asked for
        self._begun = 0  # asks covered by the pass running or done
        self._done = 0  # asks covered by finished passes
        self._closing = False
        self._locked = False  # holds the remote's writer lease
        self._deletes: set[int] = set()
        self._protections: dict[int, bool] = {}  # changes the remote has not seen yet
        self._skipped: frozenset[int] = frozenset()  # remote retention deletes them
        self._error: str | None = None
        self._failing_since: float | None = None
        self._synced_at: float | None = None

    # ---------------------------------------------------------------- listing

    def reload(self) -> dict[int, Record]:
        """List the remote; when it cannot be listed, say so (`listing_error`) and go on
        with what is known: the local tier works without it."""
        if self._thread is not None and self._error is not None:
            return self.catalog.records  # known unreachable: the sync thread retries
        try:
            self.catalog.load(self.catalog.scan())
            self._listing_error = None
        except CheckpointError as e:
            self._listing_error = str(e)
            logger.warning("the remote tier cannot be listed: %s", e)
        return self.catalog.records

    @property
    def listing_error(self) -> str | None:
        return self._listing_error

    def load(self, records: dict[int, Record]) -> None:
        self._view = self._listed = records

    def known(self) -> dict[int, Record]:
        return self.catalog.records if self._primary else self._view

    def listed(self) -> dict[int, Record]:
        return self._listed if self._distributed else self.known()

    def after_commit(self, coordinator: Coordinator, *, held: bool) -> None:
        if self._distributed:
            self._agree(coordinator, held=held)
        if self._primary:
            self._ask()

    def _agree(self, coordinator: Coordinator, *, held: bool) -> None:
        """Every process takes the primary's remote records: those it lacks and those
        gone since the last agreement, usually one step."""
        listed = self._listed
        change: tuple[dict[int, Record], set[int]] | None = None
        if coordinator.is_primary:
            live = self.known()
            change = ({s: r for s, r in live.items() if s not in listed}, set(listed) - set(live))
        change = coordinator.broadcast(change)
        assert change is not None
        added, gone = change
        agreed = {s: r for s, r in listed.items() if s not in gone}
        agreed = dict(sorted({**agreed, **added}.items()))
        if not coordinator.is_primary:
            self._view = agreed  # no syncing here: the view is all there is
        if held:
            self._agreed = agreed
        else:
            self._listed = agreed

    def release_held(self) -> None:
        if self._agreed is not None:
            self._listed, self._agreed = self._agreed, None

    # --------------------------------------------------------------- reading

    def metrics(self, step: int, saved: dict[str, Any] | None) -> dict[str, Any] | None:
        return self.catalog.metrics(step, saved)

    def location(self, step: int) -> tuple[Storage, str]:
        return self.storage, self.catalog.folder(step)

    def copy_into(self, step: int, record: Record, local: LocalStorage, folder: str) -> None:
        with filelock.FileLock(local.root / f".{folder}.download.lock"):
            if not local.exists(f"{folder}/{RECORD_NAME}"):
                copy_step(self.storage, local, (self.catalog.folder(step), folder), record)

    def reread(self, step: int) -> Record | None:
        return self.catalog.reread(step)

    def reading(self, step: int) -> contextlib.AbstractContextManager[object]:
        return self.catalog.reading(step)

    # ---------------------------------------------------------- the user's changes

    def delete(self, step: int) -> None:
        if self._primary:
            with self._cond:
                self._deletes.add(step)
            self._ask()
        with self.catalog.lock:
            self.catalog.forget([step])
        self._view = {s: r for s, r in self._view.items() if s != step}
        self._listed = {s: r for s, r in self._listed.items() if s != step}

    def set_protected(self, step: int, protected: bool) -> None:
        if self._primary:
            with self._cond:
                self._protections[step] = protected
            self._ask()

    # ---------------------------------------------------------- the sync thread

    def start(self) -> None:
        if self._primary:
            with self._cond:
                self._protections = {s: True for s in self._local_catalog.protected}
            self._ask()

    def _ask(self) -> None:
        """Ask for a pass (covering everything committed so far)."""
        with self._cond:
            self._asked += 1
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(
                    target=self._run, name="checkpointing-mirror", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = 1.0
        retry_at: float | None = None
        while True:
            with self._cond:
                while not self._closing and self._begun == self._asked:
                    if retry_at is not None and time.monotonic() >= retry_at:
                        break
                    self._cond.wait(None if retry_at is None else retry_at - time.monotonic())
                if self._closing:
                    return
                self._begun = self._asked
            try:
                self._pass()
            except Exception as e:
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
                if self._error is None:
                    self._failing_since = time.time()
                    logger.warning("the remote tier %s is behind: %s", self.storage.url, e)
                self._error = f"{type(e).__name__}: {e}"
            else:
                retry_at, backoff = None, 1.0
                if self._error is not None:
                    logger.info("the remote tier %s is in line again", self.storage.url)
                self._error = self._failing_since = None
                self._synced_at = time.time()
            with self._cond:
                self._done = self._begun
                self._cond.notify_all()

    def _pass(self) -> None:
        """Bring the remote in line with the local tier."""
        storage, catalog = self.storage, self.catalog
        if not self._locked:
            if isinstance(storage, LocalStorage):
                storage.root.mkdir(parents=True, exist_ok=True)
            storage.lock()
            self._locked = True
            is_step = lambda name: self._naming.parse(name) is not None  # noqa: E731
            for name in storage.cleanup(is_step, RECORD_NAME):
                logger.info("removed a leftover of an interrupted upload: %s", name)
        catalog.load(catalog.scan())
        self._listing_error = None
        with self._cond:
            deletes, protections = set(self._deletes), dict(self._protections)
        for step in sorted(deletes):
            with catalog.lock:
                if step in catalog.records:
                    storage.delete(catalog.folder(step), RECORD_NAME)
                catalog.forget([step])
        for step, protected in protections.items():
            catalog.set_protected(step, protected)
        with self._cond:
            self._deletes -= deletes
            for step, protected in protections.items():
                if self._protections.get(step) == protected:
                    del self._protections[step]
        self._upload(deletes)
        catalog.carry_metrics(self._local_catalog)  # recorded locally by evaluators
        pruned = self._pruner.apply(SingleProcess())
        self._skipped = self._skipped | set(pruned)  # where it belongs: not behind

    def _upload(self, deleted: set[int]) -> None:
        """Upload the local steps the remote lacks, but those its retention would delete
        at once; newest first, so that the resume point is remote soonest."""
        local = self._local_catalog
        remote = self.catalog.records
        todo = {s: r for s, r in local.records.items() if s not in remote and s not in deleted}
        # Ranked with the metrics evaluation jobs recorded locally, as they will be.
        ranked = {
            s: dataclasses.replace(r, metrics=local.metrics(s, r.metrics)) for s, r in todo.items()
        }
        self._skipped = frozenset(set(self._pruner.decide(extra=ranked).delete) & todo.keys())
        for step in sorted(todo.keys() - self._skipped, reverse=True):
            # An incremental save's origins go first: a step is never listed on the
            # remote before the files it reads are there.
            for origin in [*sorted(todo[step].references), step]:
                if origin not in self.catalog.records and not self._copy(origin, todo):
                    break

    def _copy(self, step: int, todo: dict[int, Record]) -> bool:
        """Upload a local step; False if it is no longer there."""
        local = self._local_catalog
        with local.reading(step):  # the local retention keeps it meanwhile
            if step not in local.records or step not in todo:
                logger.error("step %d is gone from the local tier before its upload", step)
                return False
            names = (local.folder(step), self._naming.name(step))
            copy_step(self._local, self.storage, names, todo[step])
        self.catalog.add(step, todo[step])
        logger.debug("uploaded step %d to %s", step, self.storage.url)
        return True

    def wait(self) -> None:
        with self._cond:
            if self._thread is None:
                return
            self._asked += 1
            self._cond.notify_all()
            target = self._asked
            while self._done < target and not self._closing:
                self._cond.wait()
        if self._error is not None:
            behind = self.status().behind
            raise RemoteBehindError(
                f"the remote tier {self.storage.url} lacks steps {list(behind) or '(none)'}"
                f" ({self._error}). They are safe on local disk; uploads keep retrying in "
                f"the background and resume when a manager opens this directory again"
            )

    def status(self) -> MirrorStatus:
        remote = self.known()
        behind = [
            s for s in self._local_catalog.records if s not in remote and s not in self._skipped
        ]
        return MirrorStatus(
            url=self.storage.url,
            remote_steps=tuple(remote),
            behind=tuple(behind),
            last_error=self._error or self._listing_error,
            failing_since=self._failing_since,
            synced_at=self._synced_at,
        )

    def close(self) -> None:
        healthy = self._error is None
        if self._thread is not None and healthy:
            with contextlib.suppress(RemoteBehindError):
                self.wait()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:  # a pass against a dead remote is left behind
            self._thread.join(None if healthy else CLOSE_WAIT_SECS)
        behind = self.status().behind if self._thread is not None else ()  # a syncer
        if behind:
            logger.warning(
                "closing with steps %s not on the remote tier %s (%s); they are uploaded "
                "when a manager opens this local directory again",
                list(behind),
                self.storage.url,
                self._error,
            )
        if self._locked:
            with contextlib.suppress(Exception):
                self.storage.unlock()
