"""`CheckpointManager`: save, list, restore and prune the checkpoints of one run.

The manager wires the parts and keeps the public methods thin (their docstrings, the
public API's reference, are most of this module). Reading guide, in the
order data flows on ``save``: `saving` decides and writes (policy, flatten, snapshot,
files, commit record), `catalog` lists the new step, `pruning` deletes what no retention
rule keeps, `remote_tier` uploads. Restore runs through `restoring`; evaluation jobs use
`leases` and `follow`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from checkpointing import follow, leases
from checkpointing._checks import check_int
from checkpointing.catalog import StepCatalog
from checkpointing.coordination import Coordinator
from checkpointing.distributed.coordinator import default_coordinator
from checkpointing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidOptionError,
    PartialRestoreError,
    ReadOnlyError,
    RemoteUnavailableError,
    StepAlreadyExistsError,
    StepOrderError,
)
from checkpointing.format.naming import PrefixNaming, ReaderNaming, StepNaming
from checkpointing.format.record import RECORD_NAME, Record, from_json_value, to_json_value
from checkpointing.options import (
    CheckpointManagerOptions,
    retention_policy_from_options,
    save_policy_from_options,
)
from checkpointing.policies.retention import KeepBest, RetentionPolicy
from checkpointing.pruning import Pruner, StepReport
from checkpointing.remote_tier import Mirror, MirrorStatus, NoRemote
from checkpointing.restoring import Restorer, describe_items
from checkpointing.saving import Saver, SaveStats
from checkpointing.storage import open_storage
from checkpointing.storage.cache import (
    DEFAULT_MAX_BYTES as DEFAULT_CACHE_MAX_BYTES,
    StepCache,
    default_cache_dir,
)
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


class CheckpointManager:
    """Saves and restores the state of a training run in ``directory``.

    >>> with CheckpointManager("runs/exp1/ckpt", CheckpointManagerOptions(max_to_keep=3)) as mgr:
    ...     mgr.restore(state, missing_ok=True)
    ...     mgr.save(step, state, metrics={"loss": loss})

    Args:
        directory: A local path, or an fsspec URL (``s3://``, ``gs://``, ...).
        options: Save and retention policies and the rest (`CheckpointManagerOptions`).
        remote: Mirror the local directory to this URL in the background
            (docs/remote.md).
        remote_retention: The mirror's retention: "same" as local, None to keep every
            step, or a policy.
        storage_options: Options for the fsspec filesystem (credentials, endpoint).
        cache_dir: Where steps of an object store are cached for restores
            (``$XDG_CACHE_HOME/checkpointing/steps`` by default).
        cache_max_bytes: The cache's bound; least recently used steps go first.
        clock: Wall-clock seconds, for time-based policies (tests pass a fake one).
        coordinator: How the processes of a job agree; detected under torch.distributed.
        on_commit: Called as ``on_commit(step, directory)`` once per step this manager
            committed (on the main process of a job, on the save's background thread
            when async), after retention ran: attach uploads to a model hub or an
            experiment tracker there instead of polling. Keep it quick or hand the work
            off; its exceptions are logged, never raised into the save.

    Raises:
        DirectoryLockedError: Another manager is writing to ``directory`` (open it
            with ``read_only=True`` to only read).
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
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        coordinator: Coordinator | None = None,
        on_commit: Callable[[int, str], object] | None = None,
    ) -> None:
        self.options = options = options or CheckpointManagerOptions()
        self._clock = clock
        self._on_commit = on_commit
        self._coordinator = coordinator or default_coordinator(options.coordination_timeout_secs)
        self._naming: StepNaming = options.step_naming or PrefixNaming(
            options.step_prefix, options.step_format_fixed_length
        )
        if options.read_only and options.step_naming is None:
            self._naming = ReaderNaming(self._naming)
        create = options.create and not options.read_only
        self._storage = open_storage(
            directory,
            create=create,
            storage_options=storage_options,
            lease_secs=options.writer_lease_secs,
        )
        check_int("cache_max_bytes", cache_max_bytes, low=0)
        retention = retention_policy_from_options(options)
        primary = self._coordinator.is_primary
        self._catalog = StepCatalog(
            self._storage, self._naming, primary=primary, read_only=options.read_only
        )
        self._remote: NoRemote = NoRemote()
        if remote is not None:
            self._remote = Mirror(
                remote,
                local=self._storage,
                local_catalog=self._catalog,
                storage_options=storage_options,
                retention=retention if remote_retention == "same" else remote_retention,
                naming=self._naming,
                coordinator=self._coordinator,
                always_keep_latest=options.always_keep_latest,
                lease_secs=options.writer_lease_secs,
                clock=clock,
            )
        self._pruner = Pruner(
            self._storage,
            self._catalog,
            retention,
            always_keep_latest=options.always_keep_latest,
            clock=clock,
        )
        self._restorer = Restorer(
            self._storage,
            self._catalog,
            self._remote,
            self._coordinator,
            # Steps of a remote directory are restored from a local copy (storage.cache).
            cache=StepCache(Path(cache_dir or default_cache_dir()), cache_max_bytes),
            verify_checksums=options.verify_checksums,
            read_only=options.read_only,
        )
        self._closed = False
        locked = False
        try:
            if not options.read_only and primary:
                self._storage.lock()
                locked = True
                if options.cleanup_tmp_directories:
                    is_step = lambda name: self._naming.parse(name) is not None  # noqa: E731
                    for name in self._storage.cleanup(is_step, RECORD_NAME):
                        logger.info("removed leftover of an interrupted save: %s", name)
            self._saver = Saver(
                self._storage,
                self._naming,
                self._coordinator,
                save_policy_from_options(options),
                # Saves of this run name their uncommitted folders after it.
                run_id=self._coordinator.broadcast(uuid.uuid4().hex[:8]),
                clock=clock,
                enable_async=options.enable_async_checkpointing,
                async_timeout_secs=options.async_timeout_secs,
                preemption_signals=options.preemption_signals
                if options.save_on_preemption
                else None,
                on_commit=self._committed,
                incremental=(lambda step: self._catalog.record(step) is not None)
                if options.incremental
                else None,
            )
            self.reload()
            if not options.read_only:
                self._catalog.refuse_named_otherwise()
                self._remote.start()
        except BaseException:
            if hasattr(self, "_saver"):
                self._saver.close()
            if locked:
                self._storage.unlock()
            raise
        _open_managers.add(self)

    # ---------------------------------------------------------------- listing

    @property
    def directory(self) -> str:
        """The path or URL of the managed directory, as opened."""
        return self._storage.url

    def reload(self) -> None:
        """Rescan the directory for steps written or deleted by other processes.

        In a distributed job the primary scans and the others take its view (collective),
        once this manager's save in flight is done.
        """
        if self._coordinator.world_size > 1:
            self._join()  # or the listings would differ by the timing of each process
        scan = None
        if self._coordinator.is_primary:
            scan = (self._catalog.scan(), self._remote.reload())
        if self._coordinator.world_size > 1:
            scan = self._coordinator.broadcast(scan)
        assert scan is not None
        self._catalog.load(scan[0])
        self._remote.load(scan[1])

    def all_steps(self) -> list[int]:
        """Committed steps of both tiers when mirrored, from the cache (see `reload`).

        In a distributed job an async save's changes show once it is waited for (the
        next `save`, `wait_until_finished`, ...), on every process alike.

        Returns:
            Step numbers, ascending.
        """
        return sorted({*self._catalog.listed(), *self._remote.listed()})

    def latest_step(self) -> int | None:
        """The newest committed step of either tier, from the cache (see `reload`).

        Returns:
            The step, or None when there is no checkpoint.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def unreadable_steps(self) -> dict[int, str]:
        """Steps whose folder holds a commit record that cannot be used: damaged, of a
        newer format, or of another step.

        They are never listed, restored or deleted by retention; restoring the latest
        raises while one of them is newer than it (`delete` it, or restore an older
        step by number).

        Returns:
            Each such step with why it cannot be read.
        """
        return {step: str(error) for step, error in sorted(self._catalog.unreadable.items())}

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with ``step``, updated by those recorded for it later
        (`record_metrics`).

        Args:
            step: A committed step.

        Returns:
            The metrics, or None when the step has none.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
        """
        saved = self._record(step).metrics
        if self._catalog.record(step) is None:
            return self._remote.metrics(step, saved)
        return self._catalog.metrics(step, saved)

    def metadata(self, step: int | None = None) -> dict[str, Any] | None:
        """The ``metadata`` given to `save` for a step.

        Args:
            step: A committed step; the latest by default.

        Returns:
            The metadata, or None when the save was given none.

        Raises:
            CheckpointNotFoundError: There is no such step (or none at all).
        """
        metadata: dict[str, Any] | None = from_json_value(
            self._record(self._resolve(step)).metadata
        )
        return metadata

    def best_step(self) -> int | None:
        """The best committed step by the options' ``best_fn``/``best_metric``, of
        either tier when mirrored (local retention may have dropped it; `restore` reads
        it from the remote).

        Between equal scores the newer step wins.

        Returns:
            The step; None without a best rule, or when no step has the metric.
        """
        metric = self.options.best_fn or self.options.best_metric
        if metric is None:
            return None
        rank = KeepBest(1, metric, self.options.best_mode)
        scored = [
            (score, step)
            for step in self.all_steps()
            if (score := rank.score(self.metrics(step))) is not None
        ]
        return max(scored)[1] if scored else None

    def item_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Describe the items of a step from its commit record, reading no tensor data.

        Args:
            step: A committed step; the latest by default.

        Returns:
            Item names to their trees as `restore` returns them, each array replaced by
            its `TensorMetadata` (a `PerRank` item: a list of trees, one per rank).

        Raises:
            CheckpointNotFoundError: There is no such step (or none at all).
        """
        return describe_items(self._record(self._resolve(step)))

    def step_directory(self, step: int) -> str:
        """The path or URL of a step's directory, for tools that read it directly.

        Args:
            step: A step: its folder as found, or as this manager names new ones.

        Returns:
            `directory` joined with the step's folder name.
        """
        return f"{self.directory}/{self._catalog.folder(step)}"

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether the save policy wants ``step`` saved. Never for a step at or below
        the latest one committed or being saved, nor on a read-only manager.

        In a distributed job this is collective: every process gets the primary's answer
        (its clock decides time-based saves), or yes once a preemption signal reached
        any process.

        Args:
            step: The step the training loop is at.

        Returns:
            True when the step is due.
        """
        if self.options.read_only:
            return False
        # The newest committed step this process knows of, listed or not.
        latest = max({*self._catalog.records, *self._remote.known()}, default=None)
        began = None if latest is None else self._record(latest).created_at
        return self._saver.should_save(step, latest, began)

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal arrived: then save ``step`` and exit the loop.

        In a distributed job this is collective, and True once any process got the
        signal. It stays True; `should_save` says yes once for the signal, then follows
        its policy.

        Args:
            step: The step the training loop is at; unused (kept for Orbax's signature).

        Returns:
            True once a signal arrived.
        """
        del step  # same answer for every step; kept for Orbax's signature
        return self._saver.reached_preemption()

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

        With async checkpointing on, returns once the state is copied; the caller may
        then change it.

        Args:
            step: The training step. Steps only move forward.
            state: Item names to values: modules, optimizers and other objects with
                ``state_dict()``, tensors, numpy arrays, Python scalars and containers.
            metrics: Plain JSON (numbers from tensors and numpy become numbers), ranked
                by best-N retention and shown by ``checkpointing ls``.
            metadata: Plain JSON kept with the step, read back by `metadata`.
            force: Save whatever the policy says, and allow a step below the latest.

        Returns:
            False when the policy declined, else True.

        Raises:
            StepAlreadyExistsError: The step already has a checkpoint.
            StepOrderError: The step is below the latest and ``force`` is not set: a
                lower step usually means the loop forgot to resume, and saving it would
                make "latest" lie.
            ReadOnlyError: The manager is read-only or closed.
            DiskFullError: The storage ran out of space; the save was rolled back. An
                async save's failure is raised by the next call that waits for it.
        """
        self._check_writable()
        self.check_for_errors()
        check_int("step", step, low=0)
        in_flight = self._saver.pending_step
        unreadable = self._catalog.unreadable
        if step in self.all_steps() or step == in_flight or step in unreadable:
            raise StepAlreadyExistsError(
                f"step {step} already has a checkpoint in {self.directory}; delete(step) it "
                f"first if you mean to replace it"
            )
        newest = (self.latest_step(), in_flight, max(unreadable, default=None))
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
        self._saver.save(step, state, metrics, metadata, join=self._join)
        return True

    def _committed(self, record: Record, coordinator: Coordinator, held: bool) -> None:
        """A save committed ``record``: list it, apply retention, upload (on the thread
        that saved; ``held``: listed from the save's join)."""
        self._catalog.add(record.step, record, held=held)
        self._pruner.apply(coordinator, held=held)
        self._remote.after_commit(coordinator, held=held)
        if self._on_commit is not None and coordinator.is_primary:
            try:
                self._on_commit(record.step, self.step_directory(record.step))
            except Exception:
                logger.exception("the on_commit hook failed for step %d", record.step)

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed; raise its failure, if any.

        Mirrored, then bring the remote tier in line now.

        Raises:
            CheckpointError: The save in flight failed (`DiskFullError`, say); its step
                was not committed.
            RemoteBehindError: Mirrored, the remote still lacks steps (they are safe
                locally; see `mirror_status`).
        """
        self._join()
        self._remote.wait()

    def _join(self) -> None:
        """Wait for the save in flight; what it changed enters the listings."""
        try:
            self._saver.join()
        finally:
            self._catalog.release_held()
            self._remote.release_held()

    def check_for_errors(self) -> None:
        """Raise the failure of a finished background save, without waiting.

        A mirror's upload failures never reach the training loop: see `mirror_status`.

        Raises:
            CheckpointError: The background save failed (`DiskFullError`, say); its step
                was not committed.
        """
        self._saver.raise_error()

    def is_saving_in_progress(self) -> bool:
        """Whether a background save of this manager is still being written.

        Returns:
            True until the save in flight has committed or failed.
        """
        return self._saver.busy

    def mirror_status(self) -> MirrorStatus | None:
        """Where the remote tier stands. Uploads run in the background and retry until
        the remote answers.

        Returns:
            The remote's steps, those it lacks, its last error; None when not mirrored.
        """
        return self._remote.status()

    def last_save_stats(self) -> SaveStats | None:
        """Timings of the newest committed save of this manager.

        Returns:
            Its `SaveStats`; None before this manager committed a save.
        """
        return self._saver.last_stats

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
        """Restore a step (the latest by default), checked before it changes anything.

        Files, headers and the target's fit (a module's keys and shapes) are checked
        before anything is read into the target. A save of this manager still in flight
        is waited for when it is the step asked for.

        Args:
            target: A mapping like the one given to `save`: objects with
                ``load_state_dict`` are loaded in place, tensors of matching shape and
                dtype are filled in place. Without it, the saved items come back as
                containers of CPU tensors.
            step: The step to restore; the latest committed one by default. A
                read-only manager looks again (`reload`) for a step it has not listed,
                as the steps `checkpoints_iterator` yields.
            items: Only these items, reading only their bytes.
            missing_ok: Return None instead of raising when there is no checkpoint.
            all_or_nothing: Read the step into new memory first (as much again as the
                items restored) and change the target only once all of it checked out.

        Returns:
            The tree, with the restored items in place of the target's; None when there
            is no checkpoint and ``missing_ok``.

        Raises:
            CheckpointNotFoundError: There is no such step (or none at all).
            TargetMismatchError: The target does not fit the step; nothing was changed.
            CorruptCheckpointError: A file is damaged, found before the target changed.
            PartialRestoreError: Damage found after part of the target was overwritten
                (never with ``all_or_nothing``).
            ItemNotFoundError: An item asked for is not in the step.
            UnsupportedFormatError: The step was written by a newer version of the
                library (upgrade), or in a retired format.
            RemoteUnavailableError: Mirrored, no local step, and the remote tier could not
                be listed: its newest step may be the one to resume from.
        """
        if isinstance(target, int) and not isinstance(target, bool):
            raise InvalidOptionError(
                f"restore({target}): the first argument is the target to restore into; "
                f"for step {target} call restore(step={target}) (or restore(state, "
                f"step={target}))"
            )
        if target is not None and not isinstance(target, Mapping):
            raise InvalidOptionError(
                f"target must be a mapping of item names, like the state given to save(); "
                f"got {type(target).__name__}"
            )
        if step is None or step == self._saver.pending_step:
            self._join()  # a save in flight is about to be the step asked for
        if step is not None and self.options.read_only and step not in self.all_steps():
            self.reload()  # an evaluation job handed a step saved since it listed
        wanted = step if step is not None else self.latest_step()
        if self._coordinator.world_size > 1:  # everyone restores the primary's choice
            wanted = self._coordinator.broadcast(wanted)
        self._catalog.refuse_unreadable(wanted, latest=step is None)
        unlisted = self._remote.listing_error
        if step is None and unlisted is not None and not self._catalog.records:
            raise RemoteUnavailableError(
                f"no local checkpoint, and the remote tier could not be listed ({unlisted}); "
                f"its newest step may be the one to resume from. Retry when it answers"
            )
        if missing_ok and wanted not in self.all_steps():
            return None
        step = self._resolve(wanted)
        with self._catalog.reading(step), self._remote.reading(step):
            record = self._record(step)
            try:
                return self._restorer.restore(record, target, items, all_or_nothing=all_or_nothing)
            except CorruptCheckpointError as e:
                fresh = None if isinstance(e, PartialRestoreError) else self._reread(step)
                if fresh is None:
                    raise
                logger.info(
                    "step %d changed on %s since listed; restoring it anew", step, self.directory
                )
                return self._restorer.restore(fresh, target, items, all_or_nothing=all_or_nothing)

    def verify(self, step: int | None = None) -> None:
        """Check every file of a step against its commit record (sizes and checksums),
        without restoring it.

        Args:
            step: A committed step; the latest by default.

        Raises:
            CorruptCheckpointError: A file is missing or damaged; the message names the
                first one.
            CheckpointNotFoundError: There is no such step (or none at all).
        """
        self._restorer.verify(self._record(self._resolve(step)))

    # ------------------------------------------------------- evaluation jobs

    @contextlib.contextmanager
    def reading(self, step: int) -> Iterator[bool]:
        """Keep the training job's retention away from ``step`` during the block.

        A reader lease, for evaluation jobs. Works on read-only managers: leases are
        theirs to write.

        Args:
            step: The step about to be read.

        Yields:
            Whether the step still exists once the lease is held (it may have been
            deleted just before).
        """
        with leases.lease(self._storage, step):
            yield self._storage.exists(
                f"{self._catalog.folder(step)}/{RECORD_NAME}"
            ) and not leases.being_deleted(self._storage, step, time.time())

    def leased_steps(self) -> set[int]:
        """Steps that evaluation jobs hold a live reader lease on (`reading`).

        Returns:
            The leased steps; retention does not delete them.
        """
        return leases.leased_steps(self._storage, time.time())

    def iter_new_checkpoints(self, **kwargs: Any) -> Iterator[int]:
        """New committed steps as they appear, each under a reader lease while the loop
        body runs: `checkpoints_iterator` for a manager already open.

        Args:
            **kwargs: ``min_interval_secs``, ``timeout``, ``timeout_fn``,
                ``poll_interval_secs`` and ``every_step``, as for `checkpoints_iterator`.

        Returns:
            An iterator of committed step numbers, ascending.
        """
        return follow.iter_new_checkpoints(self, **kwargs)

    def record_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Store metrics for ``step`` beside it (not in its commit record), e.g. from a
        separate evaluation job.

        Best-N retention uses them after the writer's next `reload` or save. Allowed on
        read-only managers.

        Args:
            step: A committed step.
            metrics: Plain JSON, merged over the metrics recorded for the step before.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed (or was deleted meanwhile).
        """
        if step == self._saver.pending_step:
            self._join()  # this manager is still saving it
        self._record(step)
        self._catalog.record_metrics(step, to_json_value(metrics, "metrics"))

    # ---------------------------------------------------------------- deleting

    def delete(self, step: int) -> None:
        """Delete a committed step (from both tiers, when mirrored), or an unreadable one
        (`unreadable_steps`). Collective in a distributed job.

        Args:
            step: The step to delete.

        Raises:
            CheckpointNotFoundError: There is no such step.
            ReadOnlyError: The manager is read-only or closed.
            CheckpointError: An incremental save of another step reads tensors from
                this one's files; delete that step first.
        """
        self._check_writable()
        self._join()
        primary = self._coordinator.is_primary
        catalog = self._catalog
        if step not in catalog.unreadable:
            self._record(step)
        readers = sorted(s for s, r in catalog.records.items() if step in r.references)
        if readers:
            raise CheckpointError(
                f"step {step} holds tensors that step(s) {readers} read (incremental saves); "
                f"delete those first, or keep it"
            )
        with catalog.lock:
            if step in catalog.records or step in catalog.unreadable:
                if primary:
                    self._storage.delete(catalog.folder(step), RECORD_NAME)
                catalog.forget([step])
            if step in self._remote.known():
                self._remote.delete(step)
            if step in catalog.protected:
                catalog.set_protected(step, False)
                self._remote.set_protected(step, False)
        self._coordinator.barrier(f"delete step {step}")

    def protect(self, step: int) -> None:
        """Pin ``step`` so that retention never deletes it (persisted in the directory).

        Args:
            step: A committed step.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            ReadOnlyError: The manager is read-only or closed.
        """
        self._check_writable()
        self._record(step)
        self._catalog.set_protected(step, True)
        self._remote.set_protected(step, True)

    def unprotect(self, step: int) -> None:
        """Undo `protect`; the step is subject to retention at the next save.

        Args:
            step: A protected step (any other is left as it is).

        Raises:
            ReadOnlyError: The manager is read-only or closed.
        """
        self._check_writable()
        self._catalog.set_protected(step, False)
        self._remote.set_protected(step, False)

    def retention_report(self) -> list[StepReport]:
        """What retention would decide now, deleting nothing.

        Returns:
            A `StepReport` for every committed step: kept or not, and by which rule(s),
            steps that evaluation jobs hold a reader lease on included.
        """
        return self._pruner.report(self.leased_steps())

    def prune(self, *, dry_run: bool = False) -> list[int]:
        """Apply retention now (it also runs after every save).

        Args:
            dry_run: Only say what would be deleted.

        Returns:
            The steps deleted (or that would be), ascending.

        Raises:
            ReadOnlyError: The manager is read-only or closed (not with ``dry_run``).
        """
        if dry_run:
            return list(self._pruner.decide(self.leased_steps()).delete)
        self._check_writable()
        self._join()
        return sorted(self._pruner.apply(self._coordinator))

    def copy_to(
        self,
        other: CheckpointManager,
        *,
        dry_run: bool = False,
        progress: Callable[[int], object] = lambda n: None,
    ) -> list[int]:
        """Copy the committed steps that ``other`` lacks into it (e.g. local disk to a
        bucket), each commit record last; a save of this manager in flight is waited
        for first.

        Then carry this directory's protections, and the metrics evaluation jobs
        recorded, over to the steps both have. Nothing is deleted or unprotected in
        ``other``.

        Args:
            other: The manager of the destination directory, open for writing.
            dry_run: Only say what would be copied.
            progress: Called with the byte count of each chunk as it is copied.

        Returns:
            The steps copied (or that would be), ascending.

        Raises:
            ReadOnlyError: ``other`` is read-only or closed.
            CorruptCheckpointError: A source file is damaged; that step is not committed
                in ``other``.
        """
        self._join()
        todo = {s: r for s, r in self._catalog.records.items() if s not in other._catalog.records}
        if dry_run:
            return sorted(todo)
        other._check_writable()
        self._check_references_copy(todo, other)
        for step, record in sorted(todo.items()):
            names = (self._catalog.folder(step), other._naming.name(step))
            copy_step(self._storage, other._storage, names, record, progress)
            other._catalog.add(step, record)
        theirs = other._catalog
        for step in sorted(self._catalog.protected & theirs.records.keys() - theirs.protected):
            theirs.set_protected(step, True)
        theirs.carry_metrics(self._catalog)
        return sorted(todo)

    def _check_references_copy(self, todo: Mapping[int, Record], other: CheckpointManager) -> None:
        """Incremental steps go only where the files they read go too: the destination's
        step of that number is the one copied (before, in step order) or has those very
        files."""
        for step, record in sorted(todo.items()):
            for origin, files in record.references.items():
                theirs = todo.get(origin) or other._catalog.record(origin)
                if theirs is None or any(theirs.files.get(n) != i for n, i in files.items()):
                    raise CheckpointError(
                        f"step {step} reads files of step {origin}, which {other.directory} "
                        f"lacks or holds otherwise, and this directory cannot copy; "
                        f"nothing was copied"
                    )

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Finish the save in flight, then release the lock and signal handlers.

        Idempotent. Raises the failure of the last background save, if any. Mirrored,
        uploads are finished while the remote answers; steps it still lacks are logged
        and uploaded when a manager opens this directory again.
        """
        if self._closed:
            return
        self._closed = True
        _open_managers.discard(self)
        try:
            self._join()
        finally:
            self._remote.close()
            self._saver.close()
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

    def _reread(self, step: int) -> Record | None:
        """The step's record read again, if it changed since listed (a run deleted and
        re-created at the same URL under a reader); None if it did not."""
        if self._catalog.record(step) is None:
            return self._remote.reread(step)
        return self._catalog.reread(step)

    def _record(self, step: int) -> Record:
        """The record of a step of either tier; else a typed error saying why."""
        record = self._catalog.record(step) or self._remote.known().get(step)
        if record is not None:
            return record
        self._catalog.refuse_unreadable(step, latest=False)
        raise CheckpointNotFoundError(
            f"no checkpoint for step {step} in {self.directory}; committed steps: "
            f"{self.all_steps() or 'none'} (call reload() to see other processes' saves)"
        )


def checkpoints_iterator(
    directory: str,
    *,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    poll_interval_secs: float = 1.0,
    every_step: bool = False,
    storage_options: dict[str, Any] | None = None,
    step_naming: StepNaming | None = None,
) -> Iterator[int]:
    """Follow ``directory`` read-only: yield each new committed step, under a reader
    lease that keeps the writer's retention from deleting it while the loop body runs.

    Args:
        directory: A local path or an fsspec URL, as the writer opened it.
        min_interval_secs: At least this long between two yields.
        timeout: End after this many seconds without a new step (None: never).
        timeout_fn: At a timeout, keep waiting while it returns False.
        poll_interval_secs: Seconds between listings.
        every_step: Yield every new step in order; by default only the newest of
            those that appeared since the last yield (Orbax's semantics).
        storage_options: Options for the fsspec filesystem.
        step_naming: The writer's folder naming; by default folders named
            ``step_<n>``, ``<n>`` and ``checkpoint_<n>`` are all found.

    Yields:
        Committed step numbers, ascending.
    """
    options = CheckpointManagerOptions(read_only=True, step_naming=step_naming)
    with CheckpointManager(directory, options, storage_options=storage_options) as manager:
        yield from follow.iter_new_checkpoints(
            manager,
            min_interval_secs=min_interval_secs,
            timeout=timeout,
            timeout_fn=timeout_fn,
            poll_interval_secs=poll_interval_secs,
            every_step=every_step,
        )


def wait_for_new_checkpoint(
    directory: str,
    *,
    until_step: int | None = None,
    timeout: float | None = None,
    poll_interval_secs: float = 1.0,
    storage_options: dict[str, Any] | None = None,
    step_naming: StepNaming | None = None,
) -> int | None:
    """Wait until ``directory`` holds a committed step newer than ``until_step``.

    Args:
        directory: A local path or an fsspec URL.
        until_step: Wait for a step above this one (any step, if None).
        timeout: Give up after this many seconds (None: never).
        poll_interval_secs: Seconds between listings.
        storage_options: Options for the fsspec filesystem.
        step_naming: The writer's folder naming (found by default, as by
            `checkpoints_iterator`).

    Returns:
        The newest committed step, or None after ``timeout`` (Orbax's function of the
        same name returns -1).
    """
    options = CheckpointManagerOptions(read_only=True, step_naming=step_naming)
    deadline = None if timeout is None else time.monotonic() + timeout
    with CheckpointManager(directory, options, storage_options=storage_options) as manager:
        while True:
            latest = manager.latest_step()
            if latest is not None and (until_step is None or latest > until_step):
                return latest
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(poll_interval_secs)
            manager.reload()
