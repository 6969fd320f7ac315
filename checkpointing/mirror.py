"""The remote tier of a mirrored manager: uploads after the local commit, own retention.

Saves commit on local disk at disk speed; then a background uploader copies every local
step the remote lacks (the commit record last, so a half-uploaded step stays invisible
and the next upload redoes it), and applies the remote tier's retention. The remote tier
keeps its own newest step, like the local one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from checkpointing.background import BackgroundWriter
from checkpointing.errors import CheckpointError
from checkpointing.format.record import MAX_RECORD_BYTES, RECORD_NAME, Record
from checkpointing.policies.retention import CheckpointInfo, RetentionPolicy, decide_retention
from checkpointing.storage import Storage, open_storage
from checkpointing.storage.transfer import copy_step

logger = logging.getLogger("checkpointing")


class Mirror:
    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None,
        retention: RetentionPolicy | None,
        name_of: Callable[[int], str],
        step_of: Callable[[str], int | None],
    ) -> None:
        self.storage = open_storage(url, create=True, storage_options=storage_options)
        self.records: dict[int, Record] = {}
        self._retention = retention
        self._name_of = name_of
        self._step_of = step_of
        self._uploader = BackgroundWriter()

    def reload(self) -> None:
        """List the remote steps; those whose record cannot be used are skipped (logged)."""
        found = {}
        for name in self.storage.committed(RECORD_NAME):
            step = self._step_of(name)
            if step is None:
                continue
            where = f"{self.storage.url}/{name}/{RECORD_NAME}"
            try:
                record = self.records.get(step) or Record.from_json(
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
        self.records = dict(sorted(found.items()))

    def upload(self, local: Storage, local_records: Mapping[int, Record], now: float) -> None:
        """Start uploading the local steps the remote lacks (after the previous upload)."""
        self._uploader.join()
        todo = {s: r for s, r in local_records.items() if s not in self.records}
        self._uploader.start(max(local_records), lambda _: self._upload(local, todo, now), None)

    def _upload(self, local: Storage, todo: Mapping[int, Record], now: float) -> None:
        for step, record in todo.items():
            name = self._name_of(step)
            copy_step(local, self.storage, (name, name), record)
            self.records = dict(sorted({**self.records, step: record}.items()))
            logger.debug("uploaded step %d to %s", step, self.storage.url)
        if self._retention is None:
            return
        infos = [CheckpointInfo(s, r.committed_at, r.metrics) for s, r in self.records.items()]
        for step in decide_retention(infos, self._retention, now=now).delete:
            self.delete(step)

    def delete(self, step: int) -> None:
        self.storage.delete(self._name_of(step), RECORD_NAME)
        self.records = {s: r for s, r in self.records.items() if s != step}

    def wait(self) -> None:
        """Wait for the upload in flight; raise its failure, once."""
        self._uploader.wait()

    def raise_error(self) -> None:
        self._uploader.raise_error()

    @property
    def busy(self) -> bool:
        return self._uploader.busy
