"""`CheckpointManager`: save, list, restore and prune the checkpoints of one run.

Reading guide, in the order data flows on ``save``: the save policy decides
(`policies.save`), the state is flattened into a JSON tree plus tensor blobs
(`format.tree`), blobs are streamed into safetensors files under a temporary name
(`format.tensors`, `storage`), the commit record is written last (`format.record`),
the step becomes visible atomically, and retention deletes what no rule keeps
(`policies.retention`). Restore runs the other way (`format.reader`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from checkpointing import watch
from checkpointing.background import BackgroundWriter, SaveStats, SnapshotBuffers, parallel_map
from checkpointing.coordination import Coordinator, PerRank
from checkpointing.distributed.coordinator import default_coordinator
from checkpointing.errors import (
    DISK_FULL_ERRNOS,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    InvalidOptionError,
    ItemNotFoundError,
    ReadOnlyError,
    StepAlreadyExistsError,
    StepOrderError,
    UnsupportedFormatError,
)
from checkpointing.format import schema, tensors, tree
from checkpointing.format.naming import PrefixNaming, StepNaming
from checkpointing.format.reader import StepReader
from checkpointing.format.record import (
    MAX_RECORD_BYTES,
    RECORD_NAME,
    FileInfo,
    Record,
    to_json_value,
)
from checkpointing.mirror import Mirror
from checkpointing.options import CheckpointManagerOptions
from checkpointing.policies.preemption import PreemptionWatcher
from checkpointing.policies.retention import (
    CheckpointInfo,
    KeepBest,
    RetentionDecision,
    RetentionPolicy,
    decide_retention,
    retention_policy_from_options,
)
from checkpointing.policies.save import SaveContext, decide_save, save_policy_from_options
from checkpointing.restoring import restore_items
from checkpointing.storage import FsspecStorage, LocalStorage, Storage, open_storage
from checkpointing.storage.base import StepWriter
from checkpointing.storage.cache import fetch_step
from checkpointing.storage.transfer import copy_step

logger = logging.getLogger("checkpointing")

# Managers with a save possibly in flight, finished at interpreter exit (see `close`).
_open_managers: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _finish_saves_at_exit() -> None:
    for manager in list(_open_managers):
        try:
            manager.close()
        except Exception:
            logger.exception("a checkpoint save failed while the interpreter exited")


_MAX_BOOKKEEPING_BYTES = 16 << 20  # protected.json, recorded_metrics.json
PROTECTED_NAME = "protected.json"
RECORDED_METRICS_NAME = "recorded_metrics.json"  # metrics written back by evaluators


@dataclasses.dataclass
class _SaveJob:
    step: int
    token: str  # the same on every process of a job: names the uncommitted step
    started: float
    flat: tree.FlatState  # what this process writes (see `CheckpointManager._flatten`)
    per_rank: dict[str, tree.Node]  # the trees of this process's `PerRank` items
    chunks: dict[str, list[dict[str, Any]]]  # nodes of the DTensor shards it writes, by key
    metrics: dict[str, Any] | None
    metadata: dict[str, Any] | None


@dataclasses.dataclass
class _Scan:
    """What `CheckpointManager.reload` found (the primary's, in a distributed job)."""

    records: dict[int, Record]
    dirs: dict[int, str]  # step -> its folder's name
    unreadable: dict[int, CheckpointError]  # step -> why its record cannot be used
    protected: set[int]
    recorded: dict[int, dict[str, Any]]  # evaluator metrics by step
    mirrored: dict[int, Record]  # the remote tier's records


@dataclasses.dataclass(frozen=True)
class TensorMetadata:
    """What `CheckpointManager.item_metadata` reports for an array, without reading it."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One line of `CheckpointManager.retention_report`."""

    step: int
    kept: bool
    reasons: tuple[str, ...]
    committed_at: float
    nbytes: int
    metrics: dict[str, Any] | None


class CheckpointManager:
    """Saves and restores the state of a training run in ``directory``.

    >>> with CheckpointManager("runs/exp1/ckpt", CheckpointManagerOptions(max_to_keep=3)) as mgr:
    ...     mgr.restore(state, missing_ok=True)
    ...     mgr.save(step, state, metrics={"loss": loss})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        options: CheckpointManagerOptions | None = None,
        *,
        remote: str | None = None,
        remote_retention: RetentionPolicy | Literal["same"] | None = "same",
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.options = options or CheckpointManagerOptions()
        self._clock = clock
        self._coordinator = coordinator or default_coordinator(
            self.options.coordination_timeout_secs
        )
        self._background = self._coordinator.background()
        self._naming: StepNaming = self.options.step_naming or PrefixNaming(
            self.options.step_prefix, self.options.step_format_fixed_length
        )
        self._save_policy = save_policy_from_options(self.options)
        self._retention = retention_policy_from_options(self.options)
        self._storage: Storage = open_storage(
            directory,
            create=self.options.create and not self.options.read_only,
            storage_options=storage_options,
        )
        # Steps of a remote directory are restored from a local copy (see storage.cache).
        self._cache_dir = Path(cache_dir or _default_cache_dir(self._storage.url))
        self._mirror = None
        if remote is not None:
            self._mirror = Mirror(
                remote,
                storage_options=storage_options,
                retention=self._retention if remote_retention == "same" else remote_retention,
                name_of=self._naming.name,
                step_of=self._naming.parse,
            )
        self._records: dict[int, Record] = {}
        self._dirs: dict[int, str] = {}  # see `_name`
        self._unreadable: dict[int, CheckpointError] = {}
        # In a job of several processes, the steps an async save commits or deletes stay
        # out of (in) the listings until the training thread joins the save (the next
        # save, wait_until_finished, ...): every process then lists the same steps at
        # the same point of its program, whatever the timing of its background thread.
        self._unlisted: set[int] = set()
        self._delisted: dict[int, Record] = {}
        # The remote tier as listed in a distributed job: the primary's uploads run on
        # after each save, so every process lists the records the primary had at the
        # last save (or reload), taken into the listings at the same join.
        self._remote_listed: dict[int, Record] = {}
        self._remote_agreed: dict[int, Record] | None = None  # at the save not joined
        self._protected: set[int] = set()
        self._recorded: dict[int, dict[str, Any]] = {}  # step -> metrics recorded later
        self._closed = False
        self._preemption = PreemptionWatcher()
        self._preemption_saved = False  # a save happened after the signal
        self._preempted_anywhere = False  # a signal reached some process of the job
        self._writer = BackgroundWriter()
        self._pending_began = 0.0  # clock reading when the save in flight began
        self._buffers = SnapshotBuffers()
        self._last_stats: SaveStats | None = None
        # Guards retention and deletes against restores on other threads (the
        # background writer deletes while the caller may be reading).
        self._lock = threading.Lock()
        self._reading: dict[int, int] = {}  # step -> number of restores reading it
        if self.options.save_on_preemption:
            self._preemption.install(self.options.preemption_signals)
        try:
            if not self.options.read_only and self._coordinator.is_primary:
                self._storage.lock()
                if self.options.cleanup_tmp_directories:
                    is_step = lambda name: self._naming.parse(name) is not None  # noqa: E731
                    for name in self._storage.cleanup(is_step, RECORD_NAME):
                        logger.info("removed leftover of an interrupted save: %s", name)
            # Saves of this run name their uncommitted directories after it.
            self._run_id = self._coordinator.broadcast(uuid.uuid4().hex[:8])
            self._saves = 0
            self.reload()
        except BaseException:
            self._preemption.uninstall()
            if self._coordinator.is_primary:
                self._storage.unlock()
            raise
        _open_managers.add(self)

    # ---------------------------------------------------------------- listing

    @property
    def directory(self) -> str:
        return self._storage.url

    def reload(self) -> None:
        """Rescan the directory for steps written or deleted by other processes.

        In a distributed job the primary scans and the others take its view (collective),
        once this manager's save in flight is done.
        """
        if self._coordinator.world_size > 1:
            self._join()  # or the listings would differ by the timing of each process
        scan = self._scan() if self._coordinator.is_primary else None
        if self._coordinator.world_size > 1:
            scan = self._coordinator.broadcast(scan)
        assert scan is not None
        if self._mirror is not None:
            self._mirror.records = self._remote_listed = scan.mirrored
        with self._lock:
            self._records = scan.records
            self._dirs = scan.dirs
            self._unreadable = scan.unreadable
            self._protected = scan.protected
            self._recorded = scan.recorded

    def _scan(self) -> _Scan:
        if self._mirror is not None:
            self._mirror.reload()
        mirrored = {} if self._mirror is None else self._mirror.records
        scan = _Scan({}, {}, {}, self._load_protected(), self._load_recorded_metrics(), mirrored)
        names = self._storage.committed(RECORD_NAME)
        found = [(step, n) for n in names if (step := self._naming.parse(n)) is not None]
        # Where two folders hold one step (step_5 and step_00000005), today's name wins.
        found.sort(key=lambda s_n: (s_n[0], s_n[1] != self._naming.name(s_n[0]), s_n[1]))
        for step, name in found:
            if step in scan.dirs:
                where = f"{self.directory}/{name}"
                logger.warning("ignoring %s: step %d has another folder", where, step)
                continue
            try:
                record = self._records.get(step) or self._read_record(name, step)
            except FileNotFoundError:  # deleted by another process since the listing
                continue
            except (CorruptCheckpointError, UnsupportedFormatError) as e:
                logger.warning("step %d cannot be read: %s", step, e)
                scan.unreadable[step] = e
            else:
                scan.records[step] = record
            scan.dirs[step] = name
        scan.records = dict(sorted(scan.records.items()))
        return scan

    def unreadable_steps(self) -> dict[int, str]:
        """Steps whose folder holds a commit record that cannot be used: damaged, or of a
        newer format. They are never listed, restored or deleted by retention; restoring
        the latest step raises while one of them is newer than it (see `restore`)."""
        return {step: str(error) for step, error in sorted(self._unreadable.items())}

    def all_steps(self) -> list[int]:
        """Committed steps, ascending, of both tiers when mirrored (from the cache; see
        `reload`). In a distributed job an async save's changes show once it is waited
        for (the next `save`, `wait_until_finished`, ...), on every process alike."""
        if self._mirror is None:
            return list(self._listed())
        remote = self._mirror.records if self._coordinator.world_size == 1 else self._remote_listed
        return sorted({*self._listed(), *remote})

    def _listed(self) -> dict[int, Record]:
        """The local steps the listings show (see ``_unlisted``)."""
        records = self._records  # first: the writer sets the others before it
        unlisted, delisted = self._unlisted, self._delisted
        if not (unlisted or delisted):
            return records
        shown = {s: r for s, r in records.items() if s not in unlisted}
        return dict(sorted({**shown, **delisted}.items()))

    def latest_step(self) -> int | None:
        """The newest committed step of either tier, or None (from the cache)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with ``step``, updated by those recorded for it later."""
        saved, recorded = self._record(step).metrics, self._recorded.get(step)
        return saved if recorded is None else {**(saved or {}), **recorded}

    def best_step(self) -> int | None:
        """The best committed step by ``best_fn``/``best_metric``; None without a best rule
        or when no step has the metric. Between equal scores the newer step wins."""
        metric = self.options.best_fn or self.options.best_metric
        if metric is None:
            return None
        rank = KeepBest(1, metric, self.options.best_mode)
        scored = [
            (score, step)
            for step in self._listed()
            if (score := rank.score(self.metrics(step))) is not None
        ]
        return max(scored)[1] if scored else None

    def item_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Items of a step with arrays described by `TensorMetadata`, reading no tensor data."""
        record = self._record(self._resolve(step))

        def describe(tag: str, body: dict[str, Any], _: Any) -> TensorMetadata:
            size = (
                np.dtype(body["dtype"]).itemsize
                if tag == "ndarray"
                else tensors.parse_dtype(body["dtype"]).itemsize
            )
            shape = tuple(body["shape"])
            return TensorMetadata(shape, body["dtype"], size * math.prod(shape))

        def item(node: tree.Node) -> Any:
            if isinstance(node, dict) and "per_rank" in node:  # a `PerRank` item: by rank
                return [tree.unflatten(n, describe) for n in node["per_rank"]]
            return tree.unflatten(node, describe)

        return {name: item(node) for name, node in record.items.items()}

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether the save policy wants ``step`` saved. Never for a step at or below
        the latest one committed or being saved.

        In a distributed job this is collective: every process gets the primary's answer
        (its clock decides time-based saves), or yes once a preemption signal reached
        any process.
        """
        # The newest save this process knows of: committed, listed or not (see
        # ``_unlisted``), or still being written, which counts from the moment the
        # training thread started it, whatever the background thread has done since
        # (else a slow async save would let the time rule save again at once). Only the
        # primary's answer counts in a distributed job.
        mirrored = self._mirror.records if self._mirror is not None else {}
        latest = max({*self._records, *mirrored}, default=None)
        began = None if latest is None else self._record(latest).created_at
        pending = self._writer.pending_step
        if pending is not None and (latest is None or pending > latest):
            latest, began = pending, self._pending_began
        triggered = self._preemption.triggered
        wanted = decide_save(
            self._save_policy,
            SaveContext(
                step=step,
                latest_step=latest,
                last_save_time=began,
                now=self._clock(),
                preempted=triggered and not self._preemption_saved,
            ),
        )
        if self._coordinator.world_size > 1:
            votes = self._coordinator.all_gather((wanted, triggered))
            self._preempted_anywhere = any(t for _, t in votes)
            wanted = votes[self._coordinator.primary][0] or (
                self._preempted_anywhere and not self._preemption_saved
            )
        return wanted

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption signal arrived (at any process of a distributed job,
        where this is collective): save ``step`` and exit the loop.

        Stays True; `should_save` says yes once for the signal, then follows its policy.
        """
        del step  # same answer for every step; kept for Orbax's signature
        if self._coordinator.world_size > 1:
            self._preempted_anywhere = any(self._coordinator.all_gather(self._preemption.triggered))
        return self._preemption.triggered or self._preempted_anywhere

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as ``step`` if the save policy (or ``force``) says so.

        ``state`` maps item names to values: modules, optimizers and other objects with
        ``state_dict()``, tensors, numpy arrays, Python scalars and containers. Returns
        False when the policy declined. With async checkpointing on, returns once the
        state is copied; the caller may then mutate it.

        A step that already exists raises `StepAlreadyExistsError`. A step below the
        latest raises `StepOrderError` unless ``force`` is set: a lower step usually
        means the loop forgot to resume, and saving it would make "latest" lie.
        """
        self._check_writable()
        self.check_for_errors()
        _check_step(step)
        in_flight = self._writer.pending_step
        if step in self.all_steps() or step == in_flight or step in self._unreadable:
            raise StepAlreadyExistsError(
                f"step {step} already has a checkpoint in {self.directory}; delete(step) it "
                f"first if you mean to replace it"
            )
        newest = (self.latest_step(), in_flight, max(self._unreadable, default=None))
        latest = max((s for s in newest if s is not None), default=None)
        if latest is not None and step < latest and not force:
            raise StepOrderError(
                f"step {step} is below the latest checkpoint ({latest}) in {self.directory}. "
                f"Did the loop resume with restore()? Pass force=True to save it anyway."
            )
        if not force and not self.should_save(step):
            return False
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and k and "\0" not in k for k in state
        ):
            raise InvalidOptionError(
                "state must be a mapping of item names (non-empty str without NUL) to "
                "values, e.g. {'model': model, 'optimizer': optimizer}"
            )
        started, t0 = self._clock(), time.perf_counter()
        flat, per_rank, chunks = self._flatten(state)
        job = _SaveJob(
            step=step,
            token=f"{self._run_id}-{self._saves}",
            started=started,
            flat=flat,
            per_rank=per_rank,
            chunks=chunks,
            metrics=None if metrics is None else to_json_value(metrics, "metrics"),
            metadata=None if metadata is None else to_json_value(metadata, "metadata"),
        )
        self._saves += 1
        self._join()
        self._preemption_saved = self._preemption.triggered or self._preempted_anywhere
        if not self.options.enable_async_checkpointing:
            self._persist(job, self._coordinator, t0)
            return True
        job.flat.blobs = self._buffers.snapshot(job.flat.blobs)
        blocking = time.perf_counter() - t0
        self._pending_began = started
        self._writer.start(
            step,
            lambda abandoned: self._persist(job, self._background, t0, blocking, abandoned),
            self.options.async_timeout_secs,
        )
        return True

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed (and uploaded, when mirrored);
        raise its failure, if any."""
        self._join()
        if self._mirror is not None:
            self._mirror.wait()

    def _join(self) -> None:
        """Wait for the save in flight; its steps enter the listings (see ``_unlisted``)."""
        try:
            self._writer.wait()
        finally:
            with self._lock:
                self._unlisted, self._delisted = set(), {}
                if self._remote_agreed is not None:
                    self._remote_listed, self._remote_agreed = self._remote_agreed, None

    def check_for_errors(self) -> None:
        """Raise the failure of a finished background save or upload, without waiting."""
        self._writer.raise_error()
        if self._mirror is not None:
            self._mirror.raise_error()

    def is_saving_in_progress(self) -> bool:
        return self._writer.busy or (self._mirror is not None and self._mirror.busy)

    def last_save_stats(self) -> SaveStats | None:
        """Timings of the newest committed save of this manager."""
        return self._last_stats

    def _flatten(
        self, state: Mapping[str, Any]
    ) -> tuple[tree.FlatState, dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """What this process writes: everything on the primary, but only its `PerRank`
        items and its shards elsewhere (replicated state is written once); the trees of
        its `PerRank` items; the chunk nodes of its shards, by DTensor key."""
        own = {name: v.value for name, v in state.items() if isinstance(v, PerRank)}
        flat = tree.flatten({name: v for name, v in state.items() if name not in own})
        shards: dict[str, list[tree.Blob]] = {}
        if flat.sharded:
            from checkpointing.distributed import sharded

            shards = sharded.shard_blobs(flat.sharded, self._coordinator.rank)
        if not self._coordinator.is_primary:
            flat.blobs = []
        for blobs in shards.values():
            flat.blobs += blobs
        per_rank = {}
        for name, value in own.items():
            mine = tree.flatten({name: value})
            if mine.sharded:
                raise InvalidOptionError(
                    f"item {name!r} is PerRank but holds sharded tensors (DTensor); "
                    f"sharded tensors are already saved shard by shard: drop PerRank"
                )
            for blob in mine.blobs:  # into a file of this rank's own
                blob.group = f"{name}.rank{self._coordinator.rank}"
            flat.blobs += mine.blobs
            per_rank[name] = mine.items[name]
        chunks = {key: [n for blob in blobs for n in blob.nodes] for key, blobs in shards.items()}
        return flat, per_rank, chunks

    def _persist(
        self,
        job: _SaveJob,
        coordinator: Coordinator,
        t0: float,
        blocking: float | None = None,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> None:
        """Write, commit, cache and apply retention (on the background thread if async)."""
        t1 = time.perf_counter()
        record = self._write(job, coordinator, abandoned)
        unjoined = blocking is not None and coordinator.world_size > 1
        with self._lock:
            if unjoined:  # before _records: `_listed` reads without the lock
                self._unlisted = {*self._unlisted, job.step}
            self._records = dict(sorted({**self._records, job.step: record}.items()))
        self._apply_retention(coordinator, unjoined=unjoined)
        if self._mirror is not None and coordinator.world_size > 1:
            self._agree_on_remote(coordinator, unjoined=unjoined)
        if self._mirror is not None and self._coordinator.is_primary:
            self._mirror.upload(self._storage, self._records, self._clock())
        done = time.perf_counter()
        self._last_stats = SaveStats(
            step=job.step,
            blocking_secs=done - t0 if blocking is None else blocking,
            background_secs=0.0 if blocking is None else done - t1,
            nbytes=sum(f.size for f in record.files.values()),
        )
        logger.debug("saved step %d: %s", job.step, self._last_stats)

    def _agree_on_remote(self, coordinator: Coordinator, *, unjoined: bool) -> None:
        """Every process takes the primary's remote records (see ``_remote_listed``):
        those it lacks and those gone since the last agreement, usually one step."""
        assert self._mirror is not None
        listed = self._remote_listed
        change: tuple[dict[int, Record], set[int]] | None = None
        if coordinator.is_primary:
            live = self._mirror.records
            change = ({s: r for s, r in live.items() if s not in listed}, set(listed) - set(live))
        change = coordinator.broadcast(change)
        assert change is not None
        added, gone = change
        agreed = {s: r for s, r in listed.items() if s not in gone}
        agreed = dict(sorted({**agreed, **added}.items()))
        if not coordinator.is_primary:
            self._mirror.records = agreed  # no uploads here: the view is all there is
        with self._lock:
            if unjoined:
                self._remote_agreed = agreed
            else:
                self._remote_listed = agreed

    def _write(
        self, job: _SaveJob, coordinator: Coordinator, abandoned: Callable[[], bool]
    ) -> Record:
        """Write this process's files; the primary commits once every process wrote its
        own (in a distributed job the outcome reaches all through ``coordinator``)."""
        name = self._naming.name(job.step)
        writer = self._storage.begin(name, job.token)
        try:
            files: dict[str, FileInfo] = {}
            error: Exception | None = None
            try:
                files = self._write_files(job, writer, coordinator)
            except Exception as e:
                if coordinator.world_size == 1:
                    raise
                error = e  # the others must hear of it, or they would wait for us
            mine = (_describe(error), files, job.per_rank, job.chunks)
            reports = [mine]
            if coordinator.world_size > 1:
                coordinator.barrier(f"step {job.step} written")  # names missing ranks
                reports = coordinator.all_gather(mine)
                failed = [f"rank {r}: {report[0]}" for r, report in enumerate(reports) if report[0]]
                if error is not None:
                    raise error
                if failed:
                    raise CheckpointError(f"step {job.step} was not saved: {'; '.join(failed)}")
                files = {k: v for _, written, _, _ in reports for k, v in written.items()}
            per_rank = [nodes for _, _, nodes, _ in reports]
            items = {n: {"per_rank": [nodes[n] for nodes in per_rank]} for n in job.per_rank}
            if job.flat.sharded and coordinator.is_primary:
                from checkpointing.distributed import sharded

                dtensors = {
                    body["key"]: body
                    for node in job.flat.items.values()
                    for tag, body, _ in tree.walk(node)
                    if tag == "dtensor"
                }
                sharded.merge(dtensors, [chunks for _, _, _, chunks in reports])
            record = Record(
                step=job.step,
                created_at=job.started,
                committed_at=self._clock(),
                items={**job.flat.items, **items},
                files=dict(sorted(files.items())),
                metrics=job.metrics,
                metadata=job.metadata,
            )
            committed: Exception | None = None
            if coordinator.is_primary:
                try:
                    if abandoned():
                        raise CheckpointError(
                            f"save of step {job.step} abandoned after its timeout"
                        )
                    writer.commit(RECORD_NAME, record.to_json())
                except Exception as e:
                    committed = e
            if coordinator.world_size > 1:
                failure = coordinator.broadcast(_describe(committed))
                if failure is not None and committed is None:
                    raise CheckpointError(
                        f"the primary could not commit step {job.step}: {failure}"
                    )
            if committed is not None:
                raise committed
        except BaseException as e:
            if coordinator.is_primary:
                writer.abort()
            if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(
                    e.errno,
                    f"no space left to save step {job.step} in {self.directory} "
                    f"({e.strerror}); the save was rolled back and earlier checkpoints are "
                    f"intact. Free space, or keep fewer checkpoints (max_to_keep).",
                ) from e
            if hasattr(e, "add_note"):
                e.add_note(f"(while saving step {job.step} to {self.directory})")
            raise
        return record

    def _write_files(
        self, job: _SaveJob, writer: StepWriter, coordinator: Coordinator
    ) -> dict[str, FileInfo]:
        groups = _group_by_file(job.flat)
        written = parallel_map(
            lambda name: writer.write(name, lambda f: tensors.write_file(f, groups[name], name)),
            list(groups),
            self._storage.parallelism,
        )
        return {
            name: FileInfo(w.size, w.header_checksum, w.checksum)
            for name, w in zip(groups, written, strict=True)
        }

    # --------------------------------------------------------------- restoring

    def restore(
        self,
        target: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        items: Iterable[str] | None = None,
        missing_ok: bool = False,
        all_or_nothing: bool = False,
    ) -> dict[str, Any] | None:
        """Restore a step (the latest by default).

        With ``target`` (a mapping like the one given to `save`), objects with
        ``load_state_dict`` are loaded in place, tensors of matching shape and dtype are
        filled in place, and the tree is returned with the restored items replaced.
        Without it, the saved items come back as containers of CPU tensors. ``items``
        restricts the restore to those items and reads only their bytes. With no
        checkpoint: `CheckpointNotFoundError`, or None if ``missing_ok``. A save of
        this manager still in flight is waited for when it is the step asked for.

        Files, headers and the target's fit (a module's keys and shapes) are checked
        before anything is read into the target (`TargetMismatchError`, nothing
        changed). Damage found while reading raises `PartialRestoreError` if the target
        was already partly overwritten; with ``all_or_nothing`` the step is read into
        new memory first (as much again as the items restored) and the target changes
        only once all of it checked out.
        """
        if target is not None and not isinstance(target, Mapping):
            raise InvalidOptionError(
                f"target must be a mapping of item names, like the state given to save(); "
                f"got {type(target).__name__}"
            )
        if step is None or step == self._writer.pending_step:
            self._join()  # a save in flight is about to be the step asked for
        wanted = step if step is not None else self.latest_step()
        if self._coordinator.world_size > 1:  # everyone restores the primary's choice
            wanted = self._coordinator.broadcast(wanted)
        self._refuse_unreadable(wanted, latest=step is None)
        if missing_ok and wanted not in self.all_steps():
            return None
        step = self._resolve(wanted)
        with self._lock:
            record = self._record(step)
            self._reading[step] = self._reading.get(step, 0) + 1
        try:
            return self._restore(record, target, items, all_or_nothing)
        finally:
            with self._lock:
                self._reading[step] -= 1
                if not self._reading[step]:
                    del self._reading[step]

    def _refuse_unreadable(self, step: int | None, *, latest: bool) -> None:
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

    def _restore(
        self,
        record: Record,
        target: Mapping[str, Any] | None,
        items: Iterable[str] | None,
        all_or_nothing: bool,
    ) -> dict[str, Any]:
        step = record.step
        names = list(items) if items is not None else list(target or record.items)
        missing = [n for n in names if n not in record.items]
        if missing:
            raise ItemNotFoundError(
                f"step {step} has no item {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, record.items))}"
            )
        nodes = {n: self._item_node(record, n) for n in names}
        targets = {n: _unwrap(None if target is None else target.get(n)) for n in names}
        downloaded = False  # by this call, which checked every file while copying it
        if self._mirror is not None and step not in self._records:
            local, downloaded = self._fetch_from_mirror(step, record)
        elif isinstance(self._storage, FsspecStorage):
            local, downloaded = fetch_step(
                self._storage, self._name(step), record, self._cache_dir
            )
        else:
            assert isinstance(self._storage, LocalStorage)
            local = self._storage.root / self._name(step)
        name = local.name
        files = LocalStorage(local.parent, create=False)
        verify = self.options.verify_checksums and not downloaded
        where = f"{self.directory}/{name}"
        with StepReader(
            record,
            lambda filename: files.open_read(f"{name}/{filename}"),
            verify=verify,
            where=where,
        ) as reader:
            restored = restore_items(
                nodes, targets, reader, all_or_nothing=all_or_nothing, where=where
            )
        return restored if target is None else {**target, **restored}

    def _item_node(self, record: Record, name: str) -> tree.Node:
        """An item's tree; of a `PerRank` item, this process's own."""
        node = record.items[name]
        if not (isinstance(node, dict) and "per_rank" in node):
            return node
        saved_by, world = len(node["per_rank"]), self._coordinator.world_size
        if saved_by != world:
            raise ItemNotFoundError(
                f"item {name!r} of step {record.step} holds the own state of each of the "
                f"{saved_by} processes that saved it; this job has {world}. Restore the "
                f"other items (items=[...]) and start this one afresh."
            )
        return node["per_rank"][self._coordinator.rank]

    def _fetch_from_mirror(self, step: int, record: Record) -> tuple[Path, bool]:
        """Download a remote-only step: into the local directory (it becomes a local
        step), or into the cache for read-only managers and non-local directories."""
        assert self._mirror is not None
        name = self._naming.name(step)
        if self.options.read_only or not isinstance(self._storage, LocalStorage):
            return fetch_step(self._mirror.storage, name, record, self._cache_dir)
        fetched = fetch_step(self._mirror.storage, name, record, self._storage.root)
        with self._lock:
            self._records = dict(sorted({**self._records, step: record}.items()))
        return fetched

    def verify(self, step: int | None = None) -> None:
        """Check every file of a step (the latest by default) against its record.

        Raises `CorruptCheckpointError` naming the first bad file.
        """
        step = self._resolve(step)
        record = self._record(step)
        storage, name = self._storage, self._name(step)
        if self._mirror is not None and step not in self._records:
            storage, name = self._mirror.storage, self._naming.name(step)
        for filename, info in record.files.items():
            path = f"{name}/{filename}"
            _check_file(functools.partial(storage.open_read, path), info, f"{storage.url}/{path}")

    # ------------------------------------------------------- evaluation jobs

    @contextlib.contextmanager
    def reading(self, step: int) -> Iterator[bool]:
        """Keep the training job's retention away from ``step`` during the block.

        Yields whether the step still exists once the lease is held (it may have been
        deleted just before). Works on read-only managers: leases are theirs to write.
        """
        with watch.lease(self._storage, step):
            yield self._storage.exists(
                f"{self._name(step)}/{RECORD_NAME}"
            ) and not watch.being_deleted(self._storage, step, time.time())

    def leased_steps(self) -> set[int]:
        """Steps that evaluation jobs hold a live reader lease on."""
        return watch.leased_steps(self._storage, time.time())

    def step_directory(self, step: int) -> str:
        """The path or URL of a step's directory."""
        return f"{self.directory}/{self._name(step)}"

    def iter_new_checkpoints(self, **kwargs: Any) -> Iterator[int]:
        """New committed steps as they appear; see `checkpointing.checkpoints_iterator`."""
        return watch.iter_new_checkpoints(self, **kwargs)

    def record_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Store metrics for ``step`` beside it (not in its commit record), e.g. from a
        separate evaluation job; best-N retention uses them after the writer's next
        `reload` or save. Allowed on read-only managers."""
        if step == self._writer.pending_step:
            self._join()  # this manager is still saving it
        self._record(step)
        name = self._name(step)
        merged = {**self._recorded.get(step, {}), **to_json_value(metrics, "metrics")}
        gone = CheckpointNotFoundError(
            f"step {step} was deleted from {self.directory} meanwhile; its metrics were not "
            f"recorded"
        )
        if not self._storage.exists(f"{name}/{RECORD_NAME}"):
            raise gone
        try:  # into the step's folder, never creating it again
            self._storage.write_bytes(
                f"{name}/{RECORDED_METRICS_NAME}", json.dumps(merged).encode()
            )
        except FileNotFoundError:
            raise gone from None
        self._recorded = {**self._recorded, step: merged}

    # ---------------------------------------------------------------- deleting

    def delete(self, step: int) -> None:
        """Delete a committed step (from both tiers, when mirrored), or an unreadable one
        (`unreadable_steps`)."""
        self._check_writable()
        self.wait_until_finished()
        with self._lock:
            if step in self._unreadable:
                if self._coordinator.is_primary:
                    self._storage.delete(self._name(step), RECORD_NAME)
                self._unreadable = {s: e for s, e in self._unreadable.items() if s != step}
                self._forget([step])
            else:
                self._record(step)
            if step in self._records:
                if self._coordinator.is_primary:
                    self._storage.delete(self._name(step), RECORD_NAME)
                self._forget([step])
            if self._mirror is not None and step in self._mirror.records:
                if self._coordinator.is_primary:
                    self._mirror.delete(step)
                else:
                    self._mirror.records = {
                        s: r for s, r in self._mirror.records.items() if s != step
                    }
                self._remote_listed = {s: r for s, r in self._remote_listed.items() if s != step}
            if step in self._protected:
                self._protected.discard(step)
                self._save_protected()
        self._coordinator.barrier(f"delete step {step}")

    def _forget(self, steps: Iterable[int], *, unjoined: bool = False) -> None:
        """Drop deleted steps from the cache (listed until the join if ``unjoined``).

        Called under ``_lock``; `_listed` reads without it, so each attribute is
        replaced, never mutated, and `_delisted` is set before `_records` drops them.
        """
        gone = set(steps)
        if unjoined:
            listed = {s: r for s, r in self._records.items() if s in gone}
            self._delisted = {**self._delisted, **listed}
        self._records = {s: r for s, r in self._records.items() if s not in gone}
        self._dirs = {s: n for s, n in self._dirs.items() if s not in gone}

    def protect(self, step: int) -> None:
        """Pin ``step`` so that retention never deletes it (persisted in the directory)."""
        self._check_writable()
        self._record(step)
        self._protected.add(step)
        self._save_protected()

    def unprotect(self, step: int) -> None:
        """Undo `protect`; the step is subject to retention at the next save."""
        self._check_writable()
        self._protected.discard(step)
        self._save_protected()

    def retention_report(self) -> list[StepReport]:
        """For every committed step: kept or not, and by which rule(s)."""
        decision = self._decide()
        return [
            StepReport(
                step=step,
                kept=step in decision.keep,
                reasons=decision.keep.get(step, ()),
                committed_at=record.committed_at,
                nbytes=sum(f.size for f in record.files.values()),
                metrics=record.metrics,
            )
            for step, record in self._listed().items()
        ]

    def _decide(self, leased: Iterable[int] = ()) -> RetentionDecision:
        infos = [
            CheckpointInfo(step, r.committed_at, self.metrics(step))
            for step, r in self._records.items()
        ]
        return decide_retention(
            infos,
            self._retention,
            now=self._clock(),
            protected=self._protected,
            in_progress={*self._reading, *leased},
            always_keep_latest=self.options.always_keep_latest,
        )

    def _apply_retention(self, coordinator: Coordinator, *, unjoined: bool = False) -> None:
        """The primary decides and deletes; the others follow its decision. ``unjoined``:
        by an async save, whose deletes stay listed until it is joined."""
        if self._retention is None:
            return
        deleted: list[int] = []
        error: Exception | None = None
        if coordinator.is_primary:
            try:
                recorded = self._load_recorded_metrics()
                leased = self.leased_steps()
                with self._lock:
                    self._recorded = recorded
                    for step in self._decide(leased).delete:
                        with watch.deleting(self._storage, step) as free:
                            if not free:
                                logger.info("step %d kept: an evaluation job leased it", step)
                                continue
                            logger.info("retention deletes step %d", step)
                            self._storage.delete(self._name(step), RECORD_NAME)
                            self._forget([step], unjoined=unjoined)
                            deleted.append(step)
            except Exception as e:
                error = e
        if coordinator.world_size > 1:
            deleted, failure = coordinator.broadcast((deleted, _describe(error)))
            with self._lock:
                self._forget(deleted, unjoined=unjoined)
            if failure is not None and error is None:
                raise CheckpointError(f"retention failed on the primary: {failure}")
        if error is not None:
            raise error

    def prune(self, *, dry_run: bool = False) -> list[int]:
        """Apply retention now (it also runs after every save); return the steps deleted,
        or that would be with ``dry_run``."""
        if not dry_run:
            self._check_writable()
            self._join()
            before = set(self._records)
            self._apply_retention(self._coordinator)
            return sorted(before - set(self._records))
        return list(self._decide(self.leased_steps()).delete)

    def copy_to(
        self, other: CheckpointManager, *, progress: Callable[[int], object] = lambda n: None
    ) -> list[int]:
        """Copy the committed steps that ``other`` lacks into it, each commit record last
        (e.g. local disk to a bucket); return the steps copied."""
        other._check_writable()
        copied = []
        for step, record in self._records.items():
            if step in other._records:
                continue
            names = (self._name(step), other._naming.name(step))
            copy_step(self._storage, other._storage, names, record, progress)
            with other._lock:
                other._records = dict(sorted({**other._records, step: record}.items()))
            copied.append(step)
        return copied

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Finish the save in flight, then release the lock and signal handlers.

        Idempotent. Raises the failure of the last background save, if any.
        """
        if self._closed:
            return
        self._closed = True
        _open_managers.discard(self)
        try:
            self.wait_until_finished()
        finally:
            self._preemption.uninstall()
            if self._coordinator.is_primary:
                self._storage.unlock()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- helpers

    def _check_writable(self) -> None:
        if self.options.read_only:
            raise ReadOnlyError(f"this manager of {self.directory} is read-only")
        if self._closed:
            raise ReadOnlyError(f"this manager of {self.directory} is closed")

    def _resolve(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
            return latest
        return step

    def _record(self, step: int) -> Record:
        try:
            return self._records.get(step) or self._delisted[step]
        except KeyError:
            if self._mirror is not None and step in self._mirror.records:
                return self._mirror.records[step]
            self._refuse_unreadable(step, latest=False)
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; committed steps: "
                f"{self.all_steps() or 'none'} (call reload() to see other processes' saves)"
            ) from None

    def _read_record(self, name: str, step: int) -> Record:
        """The record in folder ``name``, which must be of ``step``."""
        path = f"{name}/{RECORD_NAME}"
        where = f"{self.directory}/{path}"
        record = Record.from_json(self._storage.read_bytes(path, MAX_RECORD_BYTES), where)
        if record.step != step:
            raise CorruptCheckpointError(
                f"{where}: the record is of step {record.step}, its folder of step {step}; "
                f"was the folder renamed? Rename it back"
            )
        return record

    def _name(self, step: int) -> str:
        """The folder of ``step``: as found (an earlier ``step_format_fixed_length`` may
        have padded it otherwise), or as this manager names new steps."""
        return self._dirs.get(step) or self._naming.name(step)

    def _load_protected(self) -> set[int]:
        """The protected steps. A damaged file stops a writer (it could otherwise delete
        a step the user pinned) and is ignored by readers."""
        where = f"{self.directory}/{PROTECTED_NAME}"
        try:
            data = self._storage.read_bytes(PROTECTED_NAME, _MAX_BOOKKEEPING_BYTES)
            return schema.check_steps(schema.loads(data, where), where)
        except FileNotFoundError:
            return set()
        except CorruptCheckpointError as e:
            if not self.options.read_only:
                raise CorruptCheckpointError(
                    f"{e}. It lists the steps protect() pinned; write the list again "
                    f"(e.g. [] for none) or delete the file, then reopen"
                ) from None
            logger.warning("ignoring %s", e)
            return set()

    def _load_recorded_metrics(self) -> dict[int, dict[str, Any]]:
        """Metrics recorded by evaluation jobs; damaged files are skipped (logged)."""
        recorded = {}
        for name in self._storage.committed(RECORDED_METRICS_NAME):
            step = self._naming.parse(name)
            if step is None:
                continue
            path = f"{name}/{RECORDED_METRICS_NAME}"
            where = f"{self.directory}/{path}"
            try:
                data = self._storage.read_bytes(path, _MAX_BOOKKEEPING_BYTES)
                recorded[step] = schema.check_metrics(schema.loads(data, where), where)
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as e:
                logger.warning("ignoring recorded metrics: %s", e)
        return recorded

    def _save_protected(self) -> None:
        if self._coordinator.is_primary:
            self._storage.write_bytes(PROTECTED_NAME, json.dumps(sorted(self._protected)).encode())


def _check_file(open_file: Callable[[], BinaryIO], info: FileInfo, where: str) -> None:
    """Raise `CorruptCheckpointError` unless the file has the size and checksums of its
    record."""
    try:
        f = open_file()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where} is missing") from None
    with f:
        size = f.seek(0, 2)
        if size != info.size:
            raise CorruptCheckpointError(
                f"{where}: size {size} bytes, the commit record says {info.size}"
            )
        checksums = tensors.file_checksums(f, where, opaque=not info.header_checksum)
    if checksums != (info.header_checksum, info.checksum):
        raise CorruptCheckpointError(f"{where}: checksum mismatch; the file is corrupt")


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, PerRank) else value


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _check_step(step: object) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidOptionError(f"step must be an int >= 0, got {step!r}")


def _group_by_file(flat: tree.FlatState) -> dict[str, list[tree.Blob]]:
    """One safetensors file per item, named after it; arrays that are items share one."""
    used: set[str] = set()
    file_of: dict[str, str] = {}
    for group in dict.fromkeys(blob.group for blob in flat.blobs):
        if group.startswith(tree.NAMED):
            file_of[group] = f"{group.removeprefix(tree.NAMED)}.safetensors"
            continue
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", group).strip(".") or "item"
        name, n = f"{base if group != tree.LEAVES else 'tensors'}.safetensors", 1
        while name.lower() in used:  # also on case-insensitive file systems
            name, n = f"{base}-{n}.safetensors", n + 1
        used.add(name.lower())
        file_of[group] = name
    groups: dict[str, list[tree.Blob]] = {}
    for blob in flat.blobs:
        groups.setdefault(file_of[blob.group], []).append(blob)
    return groups


def _default_cache_dir(url: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "checkpointing" / digest
