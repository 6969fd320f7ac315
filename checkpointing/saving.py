"""The save path, top to bottom: decide, flatten, snapshot, write, gather, commit.

`Saver.should_save` asks the save policy (`policies.save`), with the newest save this
process knows of and the preemption signal. `Saver.save` flattens the state into JSON
trees and tensor blobs (`format.tree`; on each process only what it writes), then, for
an async save, copies the blobs into reused buffers (`snapshot`) and returns; the rest
runs on a background thread (`fastio.threads.JobRunner`): `write_step` streams each
item's blobs into a safetensors file of an uncommitted step (`format.tensors`,
`storage`), gathers every process's files, and the primary writes the commit record,
which makes the step visible. ``on_commit`` then lets the manager update its catalog,
apply retention and start the upload.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from checkpointing.coordination import Coordinator, PerRank, describe
from checkpointing.errors import (
    DISK_FULL_ERRNOS,
    CheckpointError,
    DiskFullError,
    InvalidOptionError,
)
from checkpointing.fastio.threads import JobRunner, parallel_map
from checkpointing.format import tensors, tree
from checkpointing.format.naming import StepNaming
from checkpointing.format.record import RECORD_NAME, FileInfo, Record, to_json_value
from checkpointing.policies.save import SaveContext, SavePolicy, decide_save
from checkpointing.preemption import PreemptionWatcher
from checkpointing.snapshot import SnapshotBuffers
from checkpointing.storage import Storage
from checkpointing.storage.base import StepWriter

logger = logging.getLogger("checkpointing")


@dataclasses.dataclass(frozen=True)
class SaveStats:
    """Timings of one save, from `CheckpointManager.last_save_stats`.

    ``blocking_secs`` is what the training thread waited (snapshot, or the whole save
    when synchronous); ``background_secs`` is the write, commit and retention after it.

    Attributes:
        step: The step saved.
        blocking_secs: Seconds the training thread waited.
        background_secs: Seconds of the write, commit and retention in the background.
        nbytes: The size of the step's files, all processes' together.
    """

    step: int
    blocking_secs: float
    background_secs: float
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where the bytes of a blob (by group and key) were last stored: what an
    incremental save refers to when the blob has not changed since."""

    step: int
    file: str
    key: str
    checksum: str
    nbytes: int
    dtype: str
    info: FileInfo  # of the file, as its step's record lists it


@dataclasses.dataclass
class SaveJob:
    step: int
    token: str  # the same on every process of a job: names the uncommitted step
    started: float
    flat: tree.FlatState  # what this process writes (see `flatten_for`)
    per_rank: dict[str, tree.Node]  # the trees of this process's `PerRank` items
    chunks: dict[str, list[dict[str, Any]]]  # nodes of the DTensor shards it writes, by key
    metrics: dict[str, Any] | None
    metadata: dict[str, Any] | None
    # An incremental save: where each blob's bytes were last stored, and whether that
    # step is still committed; blobs unchanged since are not written again.
    stored: dict[tuple[str, str], Stored] | None = None
    present: Callable[[int], bool] = lambda step: False
    previous: int | None = None  # the step of this process's previous save
    # the files of earlier steps it refers to, by step (`_refer`)
    references: dict[int, dict[str, FileInfo]] = dataclasses.field(default_factory=dict)


# (the committed record, the coordinator of the thread that committed it, and whether the
# save's changes are held until its join: an async save of a distributed job)
OnCommit = Callable[[Record, Coordinator, bool], None]


class Saver:
    """Decides and runs saves; at most one async save in flight."""

    def __init__(
        self,
        storage: Storage,
        naming: StepNaming,
        coordinator: Coordinator,
        policy: SavePolicy,
        *,
        run_id: str,
        clock: Callable[[], float],
        enable_async: bool,
        async_timeout_secs: float | None,
        preemption_signals: tuple[int, ...] | None,
        on_commit: OnCommit,
        incremental: Callable[[int], bool] | None = None,
    ) -> None:
        """``incremental``: save incrementally (`SaveJob.stored`); it says whether a
        step is still committed, so that a save refers only to files that exist."""
        self._storage = storage
        self._naming = naming
        self._coordinator = coordinator
        self._background = coordinator.background()
        self._policy = policy
        self._run_id = run_id  # names the uncommitted folders of this run's saves
        self._saves = 0
        self._clock = clock
        self._async = enable_async
        self._async_timeout = async_timeout_secs
        self._on_commit = on_commit
        self._runner = JobRunner("save")
        self._pending_began = 0.0  # clock reading when the save in flight began
        self._buffers = SnapshotBuffers()
        self._last_stats: SaveStats | None = None
        self._preemption = PreemptionWatcher()
        self._preemption_saved = False  # a save happened after the signal
        self._preempted_anywhere = False  # a signal reached some process of the job
        self._present = incremental
        self._stored: dict[tuple[str, str], Stored] = {}  # of this process's saves
        self._previous: int | None = None  # the step of its last incremental save
        if preemption_signals is not None:
            self._preemption.install(preemption_signals)

    @property
    def pending_step(self) -> int | None:
        """The step of the async save not joined yet (running or done)."""
        return self._runner.pending_step

    @property
    def busy(self) -> bool:
        return self._runner.busy

    @property
    def last_stats(self) -> SaveStats | None:
        return self._last_stats

    def raise_error(self) -> None:
        """Raise the failure of a finished async save, once."""
        self._runner.raise_error()

    def join(self) -> None:
        """Wait for the async save in flight; raise its failure."""
        self._runner.wait()

    def close(self) -> None:
        self._preemption.uninstall()

    # ---------------------------------------------------------------- deciding

    def should_save(self, step: int, latest: int | None, began: float | None) -> bool:
        """Whether the policy wants ``step``, the newest committed step being ``latest``
        (its save began at ``began``); collective in a distributed job."""
        # A save still being written counts from the moment the training thread started
        # it, whatever the background thread has done since (else a slow async save
        # would let the time rule save again at once).
        pending = self._runner.pending_step
        if pending is not None and (latest is None or pending > latest):
            latest, began = pending, self._pending_began
        triggered = self._preemption.triggered
        wanted = decide_save(
            self._policy,
            SaveContext(
                step=step,
                latest_step=latest,
                last_save_time=began,
                now=self._clock(),
                preempted=triggered and not self._preemption_saved,
                saving=self._runner.busy,
            ),
        )
        if self._coordinator.world_size > 1:  # only the primary's answer counts
            votes = self._coordinator.all_gather((wanted, triggered))
            self._preempted_anywhere = any(t for _, t in votes)
            wanted = votes[self._coordinator.primary][0] or (
                self._preempted_anywhere and not self._preemption_saved
            )
        return wanted

    def reached_preemption(self) -> bool:
        if self._coordinator.world_size > 1:
            signals = self._coordinator.all_gather(self._preemption.triggered)
            self._preempted_anywhere = any(signals)
        return self._preemption.triggered or self._preempted_anywhere

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        join: Callable[[], None],
    ) -> None:
        """Save ``state`` as ``step``: at once, or snapshot it and write it in the
        background. ``join`` waits for the save before (the manager's, which also
        releases its held changes)."""
        started, t0 = self._clock(), time.perf_counter()
        flat, per_rank, chunks = flatten_for(state, self._coordinator)
        job = SaveJob(
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
        join()
        if self._present is not None:  # where the save just joined stored its blobs
            job.stored, job.present = self._stored, self._present
            job.previous = self._previous
        self._preemption_saved = self._preemption.triggered or self._preempted_anywhere
        if not self._async:
            self._persist(job, self._coordinator, t0)
            return
        if job.stored is not None:
            _drop_frozen(job)
        job.flat.blobs = self._buffers.snapshot(job.flat.blobs)
        blocking = time.perf_counter() - t0
        self._pending_began = started
        self._runner.start(
            step,
            lambda abandoned: self._persist(job, self._background, t0, blocking, abandoned),
            self._async_timeout,
        )

    def _persist(
        self,
        job: SaveJob,
        coordinator: Coordinator,
        t0: float,
        blocking: float | None = None,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> None:
        """Write and commit, then ``on_commit`` (on the background thread if async)."""
        t1 = time.perf_counter()
        record = write_step(job, self._storage, self._naming, coordinator, self._clock, abandoned)
        if job.stored is not None:
            self._stored = {**job.stored, **_stored_by(job.flat.blobs, record)}
            self._previous = record.step
        held = blocking is not None and coordinator.world_size > 1
        self._on_commit(record, coordinator, held)
        done = time.perf_counter()
        self._last_stats = SaveStats(
            step=job.step,
            blocking_secs=done - t0 if blocking is None else blocking,
            background_secs=0.0 if blocking is None else done - t1,
            nbytes=sum(f.size for f in record.files.values()),
        )
        logger.debug("saved step %d: %s", job.step, self._last_stats)


def flatten_for(
    state: Mapping[str, Any], coordinator: Coordinator
) -> tuple[tree.FlatState, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """What this process writes: everything on the primary, but only its `PerRank` items
    and its shards elsewhere (replicated state is written once); the trees of its
    `PerRank` items; the chunk nodes of its shards, by DTensor key."""
    own = {name: v.value for name, v in state.items() if isinstance(v, PerRank)}
    flat = tree.flatten({name: v for name, v in state.items() if name not in own})
    shards: dict[str, list[tree.Blob]] = {}
    if flat.sharded:
        from checkpointing.distributed import sharded

        shards = sharded.shard_blobs(flat.sharded, coordinator.rank)
    if not coordinator.is_primary:
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
            blob.group = f"{name}.rank{coordinator.rank}"
        flat.blobs += mine.blobs
        per_rank[name] = mine.items[name]
    chunks = {key: [n for blob in blobs for n in blob.nodes] for key, blobs in shards.items()}
    return flat, per_rank, chunks


def write_step(
    job: SaveJob,
    storage: Storage,
    naming: StepNaming,
    coordinator: Coordinator,
    clock: Callable[[], float],
    abandoned: Callable[[], bool],
) -> Record:
    """Write this process's files; the primary commits once every process wrote its own
    (in a distributed job the outcome reaches all through ``coordinator``)."""
    writer = storage.begin(naming.name(job.step), job.token)
    try:
        files: dict[str, FileInfo] = {}
        references: dict[int, dict[str, FileInfo]] = {}
        error: Exception | None = None
        try:
            files, references = _write_files(job, writer, storage.parallelism)
        except Exception as e:
            if coordinator.world_size == 1:
                raise
            error = e  # the others must hear of it, or they would wait for us
        mine = (describe(error), files, job.per_rank, job.chunks, references)
        reports = [mine]
        if coordinator.world_size > 1:
            coordinator.barrier(f"step {job.step} written")  # names missing ranks
            reports = coordinator.all_gather(mine)
            failed = [f"rank {r}: {report[0]}" for r, report in enumerate(reports) if report[0]]
            if error is not None:
                raise error
            if failed:
                raise CheckpointError(f"step {job.step} was not saved: {'; '.join(failed)}")
            files = {k: v for _, written, _, _, _ in reports for k, v in written.items()}
            references = {}
            for *_, theirs in reports:
                for origin, listed in theirs.items():
                    references.setdefault(origin, {}).update(listed)
        per_rank = [nodes for _, _, nodes, _, _ in reports]
        items = {n: {"per_rank": [nodes[n] for nodes in per_rank]} for n in job.per_rank}
        if job.flat.sharded and coordinator.is_primary:
            from checkpointing.distributed import sharded

            dtensors = {
                body["key"]: body
                for node in job.flat.items.values()
                for tag, body, _ in tree.walk(node)
                if tag == "dtensor"
            }
            sharded.merge(dtensors, [chunks for _, _, _, chunks, _ in reports])
        record = Record(
            step=job.step,
            created_at=job.started,
            committed_at=clock(),
            items={**job.flat.items, **items},
            files=dict(sorted(files.items())),
            metrics=job.metrics,
            metadata=job.metadata,
            references=references,
        )
        committed: Exception | None = None
        text = record.to_json()
        if coordinator.is_primary:
            try:
                if abandoned():
                    raise CheckpointError(f"save of step {job.step} abandoned after its timeout")
                writer.commit(RECORD_NAME, text)
            except Exception as e:
                committed = e
        if coordinator.world_size > 1:
            # The others' trees lack what the primary alone wrote (replicated tensors'
            # files and checksums, the merged shards): they take the committed record.
            failure, text = coordinator.broadcast((describe(committed), text))
            if failure is not None and committed is None:
                raise CheckpointError(f"the primary could not commit step {job.step}: {failure}")
            if not coordinator.is_primary:
                record = Record.from_json(text, f"the record of step {job.step}")
        if committed is not None:
            raise committed
    except BaseException as e:
        if coordinator.is_primary:
            writer.abort()
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                e.errno,
                f"no space left to save step {job.step} in {storage.url} ({e.strerror}); "
                f"the save was rolled back and earlier checkpoints are intact. Free space, or "
                f"keep fewer checkpoints (max_to_keep).",
            ) from e
        if hasattr(e, "add_note"):
            e.add_note(f"(while saving step {job.step} to {storage.url})")
        raise
    return record


def _drop_unchanged(
    job: SaveJob, blobs: list[tree.Blob], parallelism: int
) -> tuple[list[tree.Blob], dict[int, dict[str, FileInfo]]]:
    """Refer every blob of ``blobs`` whose bytes are those last stored to that step's
    file instead (`_unchanged`); return the blobs left to write and the files so
    referred to, by step."""
    references: dict[int, dict[str, FileInfo]] = {}
    changed = []
    for blob, was in zip(
        blobs, parallel_map(lambda b: _unchanged(job, b), blobs, parallelism), strict=True
    ):
        if was is None:
            changed.append(blob)
        else:
            _refer(blob, was, references)
    return changed, references


def _drop_frozen(job: SaveJob) -> None:
    """Before an async incremental save's snapshot, on the training thread: refer the
    CPU tensors that were unchanged at the previous save and still are, instead of
    copying them. Hashing reads their bytes once where the copy reads and writes them,
    so a frozen base costs the training thread less; tensors that changed at the
    previous save are copied as in any async save, and compared in the background."""
    assert job.stored is not None
    kept = []
    for blob in job.flat.blobs:
        was = job.stored.get((blob.group, blob.key))
        if was is not None and was.step != job.previous and blob.tensor.is_cpu:
            now = _unchanged(job, blob)
            if now is not None:
                _refer(blob, now, job.references)
                continue
        kept.append(blob)
    job.flat.blobs = kept


def _unchanged(job: SaveJob, blob: tree.Blob) -> Stored | None:
    """Where ``blob``'s bytes were last stored, if they are the same now (same size,
    dtype and xxh3-64 digest, in a step still committed)."""
    assert job.stored is not None
    was = job.stored.get((blob.group, blob.key))
    if (
        was is None
        or was.nbytes != blob.nbytes
        or was.dtype != str(blob.tensor.dtype)
        or not job.present(was.step)
    ):
        return None
    tensor = blob.tensor if blob.tensor.is_cpu else blob.tensor.cpu()
    return was if tensors.digest(tensors.byte_view(tensor)) == was.checksum else None


def _refer(blob: tree.Blob, was: Stored, references: dict[int, dict[str, FileInfo]]) -> None:
    """Point ``blob``'s tree nodes at the step that holds its bytes, never through
    another reference (a sharded tensor's chunks too: each process compares the chunks
    it writes)."""
    for node in blob.nodes:
        node.update(file=was.file, key=was.key, checksum=was.checksum, step=was.step)
    references.setdefault(was.step, {})[was.file] = was.info


def _stored_by(blobs: list[tree.Blob], record: Record) -> dict[tuple[str, str], Stored]:
    """Where ``record``'s step stored ``blobs`` (its written ones)."""
    out = {}
    for blob in blobs:
        node = blob.nodes[0]
        if "step" not in node and node.get("file") in record.files:  # written by this step
            out[blob.group, blob.key] = Stored(
                record.step, node["file"], node["key"], node["checksum"], blob.nbytes,
                str(blob.tensor.dtype), record.files[node["file"]],
            )
    return out


def _write_files(
    job: SaveJob, writer: StepWriter, parallelism: int
) -> tuple[dict[str, FileInfo], dict[int, dict[str, FileInfo]]]:
    """Write a file per group of blobs; return the files, and those of earlier steps
    that an incremental save refers to. An incremental save handles two files at once
    at least, the largest first: hashing unchanged tensors takes memory bandwidth, not
    the disk, so one file's frozen tensors are hashed while another's changed ones are
    written."""
    groups = _group_by_file(job.flat)
    files_at_once = parallelism
    if job.stored is not None:
        files_at_once = max(parallelism, 2)
        groups = dict(sorted(groups.items(), key=lambda kv: -sum(b.nbytes for b in kv[1])))

    def write(name: str) -> tuple[FileInfo | None, dict[int, dict[str, FileInfo]]]:
        blobs = groups[name]
        references: dict[int, dict[str, FileInfo]] = {}
        if job.stored is not None:
            blobs, references = _drop_unchanged(job, blobs, parallelism)
        if not blobs:  # all of it is in earlier steps' files
            return None, references
        return writer.write(name, lambda f: tensors.write_file(f, blobs, name)), references

    files: dict[str, FileInfo] = {}
    references = {step: dict(listed) for step, listed in job.references.items()}
    for name, (info, theirs) in zip(groups, parallel_map(write, list(groups), files_at_once),
                                    strict=True):
        if info is not None:
            files[name] = info
        for origin, listed in theirs.items():
            references.setdefault(origin, {}).update(listed)
    return files, references


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
