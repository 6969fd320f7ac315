"""The remote tier of a mirrored manager: uploads after the local commit, its own retention.

Saves commit on local disk at disk speed; then a background uploader copies every local
step the remote lacks (the commit record last, so a half-uploaded step stays invisible
and the next upload redoes it) and applies the remote tier's retention. The remote tier
keeps its own newest step, like the local one. `NoRemote` stands in when there is no
remote, so the manager never asks whether there is one.

In a job of several processes the primary alone uploads. At each save it broadcasts
what changed in its remote listing (usually one step), and every process lists that from
the save's join, like the local tier's held changes (`catalog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from checkpointing.coordination import Coordinator
from checkpointing.errors import CheckpointError, CheckpointNotFoundError
from checkpointing.fastio.threads import JobRunner
from checkpointing.format.naming import StepNaming
from checkpointing.format.record import MAX_RECORD_BYTES, RECORD_NAME, Record
from checkpointing.policies.retention import CheckpointInfo, RetentionPolicy, decide_retention
from checkpointing.storage import Storage, open_storage
from checkpointing.storage.cache import fetch_step
from checkpointing.storage.transfer import copy_step

logger = logging.getLogger("checkpointing")


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

    def after_commit(
        self,
        local: Storage,
        local_records: Mapping[int, Record],
        local_folder: Callable[[int], str],
        now: float,
        coordinator: Coordinator,
        *,
        held: bool,
    ) -> None:
        """A step was committed locally: upload what the remote lacks (on the primary;
        after the previous upload), and agree on the remote listing across processes
        (``held``: listed from the save's join)."""

    def release_held(self) -> None:
        """The save was joined: list the remote steps agreed at its commit."""

    def location(self, step: int) -> tuple[Storage, str]:
        """The storage and folder of a remote step."""
        raise CheckpointNotFoundError(f"step {step} has no remote copy")

    def fetch(self, step: int, record: Record, into: Path) -> tuple[Path, bool]:
        """Download a remote step into the folder ``into`` (once per node): its local
        folder, and whether this call downloaded (and so just verified) it."""
        raise CheckpointNotFoundError(f"step {step} has no remote copy")

    def delete(self, step: int, *, primary: bool) -> None:
        """Delete a remote step (the primary) and stop listing it (every process)."""

    def wait(self) -> None:
        """Wait for the upload in flight; raise its failure, once."""

    def raise_error(self) -> None:
        """Raise the failure of a finished upload, once."""

    @property
    def busy(self) -> bool:
        return False


class Mirror(NoRemote):
    """A remote copy of the local directory (``remote=`` of the manager)."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None,
        retention: RetentionPolicy | None,
        naming: StepNaming,
        distributed: bool,
    ) -> None:
        self.storage = open_storage(url, create=True, storage_options=storage_options)
        self._retention = retention
        self._naming = naming
        self._distributed = distributed
        self._live: dict[int, Record] = {}  # as this process knows it now
        self._listed: dict[int, Record] = {}  # as listings show it (distributed jobs)
        self._agreed: dict[int, Record] | None = None  # at a save not joined yet
        self._uploader = JobRunner("upload")

    def reload(self) -> dict[int, Record]:
        """List the remote steps; those whose record cannot be used are skipped (logged)."""
        found = {}
        for name in self.storage.committed(RECORD_NAME):
            step = self._naming.parse(name)
            if step is None:
                continue
            where = f"{self.storage.url}/{name}/{RECORD_NAME}"
            try:
                record = self._live.get(step) or Record.from_json(
                    self.storage.read_bytes(f"{name}/{RECORD_NAME}", MAX_RECORD_BYTES), where
                )
            except FileNotFoundError:  # deleted since the listing
                continue
            except CheckpointError as e:
                logger.warning("remote step %d cannot be read: %s", step, e)
                continue
            if record.step != step:
                logger.warning("remote step %d: %s is of step %d", step, where, record.step)
                continue
            found[step] = record
        self._live = dict(sorted(found.items()))
        return self._live

    def load(self, records: dict[int, Record]) -> None:
        self._live = self._listed = records

    def listed(self) -> dict[int, Record]:
        return self._listed if self._distributed else self._live

    def known(self) -> dict[int, Record]:
        return self._live

    def after_commit(
        self,
        local: Storage,
        local_records: Mapping[int, Record],
        local_folder: Callable[[int], str],
        now: float,
        coordinator: Coordinator,
        *,
        held: bool,
    ) -> None:
        if self._distributed:
            self._agree(coordinator, held=held)
        if coordinator.is_primary:
            self._uploader.join()
            todo = {s: r for s, r in local_records.items() if s not in self._live}

            def upload(_: Callable[[], bool]) -> None:
                self._upload(local, todo, local_folder, now)

            self._uploader.start(max(local_records), upload, None)

    def _agree(self, coordinator: Coordinator, *, held: bool) -> None:
        """Every process takes the primary's remote records: those it lacks and those
        gone since the last agreement, usually one step."""
        listed = self._listed
        change: tuple[dict[int, Record], set[int]] | None = None
        if coordinator.is_primary:
            live = self._live
            change = ({s: r for s, r in live.items() if s not in listed}, set(listed) - set(live))
        change = coordinator.broadcast(change)
        assert change is not None
        added, gone = change
        agreed = {s: r for s, r in listed.items() if s not in gone}
        agreed = dict(sorted({**agreed, **added}.items()))
        if not coordinator.is_primary:
            self._live = agreed  # no uploads here: the view is all there is
        if held:
            self._agreed = agreed
        else:
            self._listed = agreed

    def _upload(
        self,
        local: Storage,
        todo: Mapping[int, Record],
        local_folder: Callable[[int], str],
        now: float,
    ) -> None:
        for step, record in todo.items():
            copy_step(local, self.storage, (local_folder(step), self._naming.name(step)), record)
            self._live = dict(sorted({**self._live, step: record}.items()))
            logger.debug("uploaded step %d to %s", step, self.storage.url)
        if self._retention is None:
            return
        infos = [CheckpointInfo(s, r.committed_at, r.metrics) for s, r in self._live.items()]
        for step in decide_retention(infos, self._retention, now=now).delete:
            self._delete(step)

    def release_held(self) -> None:
        if self._agreed is not None:
            self._listed, self._agreed = self._agreed, None

    def location(self, step: int) -> tuple[Storage, str]:
        return self.storage, self._naming.name(step)

    def fetch(self, step: int, record: Record, into: Path) -> tuple[Path, bool]:
        return fetch_step(self.storage, self._naming.name(step), record, into)

    def delete(self, step: int, *, primary: bool) -> None:
        if primary:
            self._delete(step)
        self._live = {s: r for s, r in self._live.items() if s != step}
        self._listed = {s: r for s, r in self._listed.items() if s != step}

    def _delete(self, step: int) -> None:
        """Delete a remote step; it leaves `listed` at the next agreement."""
        self.storage.delete(self._naming.name(step), RECORD_NAME)
        self._live = {s: r for s, r in self._live.items() if s != step}

    def wait(self) -> None:
        self._uploader.wait()

    def raise_error(self) -> None:
        self._uploader.raise_error()

    @property
    def busy(self) -> bool:
        return self._uploader.busy
