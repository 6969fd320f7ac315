"""Managed checkpointing and exact resume for Hugging Face Accelerate loops.

`AccelerateCheckpointer` is the framework-neutral core: it saves the whole training state
of an ``accelerate.Accelerator`` through a `CheckpointManager` (prepared models,
optimizers, schedulers, the grad scaler, ``register_for_checkpointing`` objects, RNG
states, the data position, progress counters) and restores it in place. A plain loop::

    ckpt = AccelerateCheckpointer(manager, accelerator, total_steps=1000)
    ckpt.restore()                                   # the latest checkpoint, if any
    for epoch in ckpt.epochs():
        for batch in ckpt.batches(train_loader):     # skips what a mid-epoch resume consumed
            with accelerator.accumulate(model):
                ...; optimizer.step(); scheduler.step(); optimizer.zero_grad()
            if ckpt.step():                          # counts, saves on the policy
                break
    ckpt.finish()                                    # saves the last step, waits

`trainer_adapters.robo_orchard.CheckpointHook` plugs the same core into robo_orchard_lab's
``HookBasedTrainer``.

Several processes (``accelerate launch``): every process opens the manager, which then
coordinates through torch.distributed. The replicated state (models, optimizers, ...) is
written once, by the main process; each process's RNGs and data position are a
`PerRank` item. Resuming with a different number of processes restores the replicated
state and the counters, and starts the RNG streams afresh (logged: not bit-exact).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, PerRank
from checkpointing.errors import ItemNotFoundError
from checkpointing.format.paths import check_name
from checkpointing.storage import open_storage
from checkpointing.storage.remote import FsspecStorage
from trainer_adapters.loop import ResumableLoop, TrainingUnit

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")
logger = logging.getLogger("trainer_adapters")

__all__ = [
    "AccelerateCheckpointer",
    "accelerator_load_state",
    "get_accelerate_project_last_checkpoint_id",
]


class AccelerateCheckpointer:
    """Saves and restores an Accelerator's training state with a `CheckpointManager`.

    ``manager``: a manager (opened by every process), or a directory (then
    ``options``/``manager_kwargs`` open one in every process). ``extra``: more
    items to save (objects with ``state_dict``, tensors, Python values). ``total_steps``
    / ``total_epochs``: when the run is done (see `epochs`).
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        accelerator: Accelerator,
        *,
        options: CheckpointManagerOptions | None = None,
        extra: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        total_epochs: int | None = None,
        **manager_kwargs: Any,
    ) -> None:
        self.accelerator = accelerator
        self.extra = dict(extra or {})
        if isinstance(manager, CheckpointManager):
            self.manager = manager
        else:
            self.manager = CheckpointManager(manager, options, **manager_kwargs)
        unit = TrainingUnit.EPOCH if total_epochs is not None else TrainingUnit.ITERATION
        self.loop = ResumableLoop(
            unit, total_epochs if total_epochs is not None else total_steps,
            generators=_data_generators(accelerator),
        )
        self.last_saved: int | None = None
        # An epoch-end save waits for the next epoch (see `step`): its metrics.
        self._deferred: Mapping[str, Any] | None = None

    @property
    def progress(self) -> Any:
        return self.loop.progress

    # ------------------------------------------------------------------ state

    def replicated_state(self) -> dict[str, Any]:
        """Items equal on every process (written once, by the main process)."""
        acc = self.accelerator
        state: dict[str, Any] = {}
        for kind, objects in (
            ("model", [acc.unwrap_model(m) for m in acc._models]),
            ("optimizer", acc._optimizers),
            ("scheduler", acc._schedulers),
            ("custom", acc._custom_objects),
        ):
            for i, obj in enumerate(objects):
                state[kind if i == 0 else f"{kind}_{i}"] = obj
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        progress = {"loop": self.loop.progress.state_dict(), "accelerator": self.accelerator.step}
        return {**state, **self.extra, "progress": progress}

    def rank_state(self) -> dict[str, Any]:
        """This process's own: RNGs and data position (with the counters)."""
        return {"loop": self.loop.state()}

    def restore(self, step: int | None = None) -> int | None:
        """Load ``step`` (default: the newest complete one, local or remote) in place.
        Returns the restored step, or None when there is nothing to resume."""
        step = self._resume_step() if step is None else step
        if step is None:
            return None
        replicated = self.replicated_state()
        try:
            restored = self.manager.restore({**replicated, "rank": PerRank(None)}, step=step)
            assert restored is not None
            self.loop.load(restored["rank"]["loop"])
        except ItemNotFoundError:  # saved by another number of processes
            logger.warning(
                "step %d was saved by another number of processes: restoring the model, "
                "optimizer and counters; RNG streams and the data order start afresh, so "
                "the resumed run is not bit-exact", step,
            )
            restored = self.manager.restore(replicated, step=step)
            assert restored is not None
            self.loop.progress.load_state_dict(restored["progress"]["loop"])
        self.accelerator.step = int(restored["progress"]["accelerator"])
        for loader in self.accelerator._dataloaders:
            if hasattr(loader, "iteration"):
                loader.iteration = self.loop.progress.epoch  # what set_epoch sees
        self.last_saved = step
        self.accelerator.wait_for_everyone()
        return step

    def _resume_step(self) -> int | None:
        self.manager.reload()  # collective: every process gets the main process's view
        return self.manager.latest_step()

    # ------------------------------------------------------------------ driving

    def epochs(self) -> Iterator[int]:
        return self.loop.epochs()

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        self._save_deferred()  # the epoch before is over, its evaluation included
        return self.loop.batches(loader)

    def step(self, *, end_of_epoch: bool | None = None, metrics: Mapping[str, Any] | None = None
             ) -> bool:
        """Call once per batch, after the (possibly skipped) optimizer step: counts the
        batch, saves on the manager's policy at gradient-sync points. Returns True when
        ``total_steps``/``total_epochs`` is reached. ``end_of_epoch`` defaults to
        Accelerate's end-of-dataloader flag (prepared loaders).

        The save of an epoch's last step is made when the next epoch begins (`batches`)
        or at `finish`: an evaluation loop between epochs moves the global RNG (starting a
        DataLoader's iterator draws a seed from it), and a resumed run, which skips that
        evaluation, must continue from the RNG state after it."""
        acc = self.accelerator
        if end_of_epoch is None:
            end_of_epoch = bool(acc.gradient_state.end_of_dataloader)
        done = self.loop.advance(optimizer_stepped=acc.sync_gradients, end_of_epoch=end_of_epoch)
        if acc.sync_gradients and end_of_epoch and not done:
            self._deferred = metrics or {}
        elif acc.sync_gradients:
            self.save(metrics=metrics)
        return done

    def save(self, *, force: bool = False, metrics: Mapping[str, Any] | None = None) -> bool:
        """Save the current step if the policy (or ``force``) says so. Never between
        gradient-accumulation micro-steps: the gradients there are in no checkpoint."""
        if not self.accelerator.sync_gradients:
            return False
        return self._save(force=force, metrics=metrics)

    def _save(self, *, force: bool, metrics: Mapping[str, Any] | None) -> bool:
        step = self.loop.progress.step
        if step == self.last_saved:
            return False
        if not (force or self.manager.should_save(step)):  # collective: all agree
            return False
        state = {**self.replicated_state(), "rank": PerRank(self.rank_state())}
        self.manager.save(step, state, metrics=metrics, force=True)
        self.last_saved = step
        return True

    def _save_deferred(self) -> None:
        if self._deferred is not None:
            metrics, self._deferred = self._deferred, None
            self._save(force=False, metrics=metrics or None)

    def finish(self) -> None:
        """At the end of the loop: save the last step if it is not saved yet, and wait."""
        self._save_deferred()
        self.save(force=True)
        self.wait_until_finished()

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _data_generators(accelerator: Accelerator) -> list[torch.Generator]:
    """Generators that shuffle the prepared data loaders outside the global RNG."""
    found: dict[int, torch.Generator] = {}
    for loader in accelerator._dataloaders:
        sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
        for g in (getattr(loader, "synchronized_generator", None),
                  getattr(sampler, "generator", None), getattr(loader, "generator", None)):
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
    return list(found.values())


# ---------------------------------------------------------------------- helpers


def get_accelerate_project_last_checkpoint_id(project_dir: str | os.PathLike[str]) -> int:
    """The newest committed ``checkpoint_<n>`` of ``project_dir/checkpoints`` (the layout
    of `checkpoint_n_naming`), or -1 when there is none. Unlike the seed's helper, an
    unfinished (uncommitted) save is never returned."""
    root = Path(project_dir) / "checkpoints"
    if not root.is_dir():
        return -1
    from checkpointing.format.naming import checkpoint_n_naming
    from checkpointing.format.record import RECORD_NAME

    naming = checkpoint_n_naming()
    steps = [
        s for p in root.iterdir()
        if (s := naming.parse(p.name)) is not None and (p / RECORD_NAME).is_file()
    ]
    return max(steps, default=-1)


def accelerator_load_state(
    accelerator: Accelerator,
    input_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """``accelerator.load_state(input_dir)`` for a local or remote (``s3://``, ``gs://``)
    directory written by ``save_state``; a remote one is downloaded once per node into
    ``cache_dir`` first (file lock, verified, renamed into place), like the manager's
    own remote restores. For checkpoints written through a manager use
    `AccelerateCheckpointer.restore`."""
    path = str(input_dir)
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) or path.startswith("file://"):
        accelerator.load_state(path.removeprefix("file://"), **kwargs)
        return
    if cache_dir is None:
        raise ValueError(f"loading {path} needs a local cache_dir")
    parent, _, name = path.rstrip("/").rpartition("/")
    storage = open_storage(parent, create=False, storage_options=storage_options)
    assert isinstance(storage, FsspecStorage)
    local = Path(cache_dir)
    with accelerator.main_process_first():  # one download per node, the others wait
        target = _fetch_plain_directory(storage, name, local)
    accelerator.load_state(str(target), **kwargs)


def _fetch_plain_directory(storage: FsspecStorage, name: str, local_root: Path) -> Path:
    """Download a directory without a commit record (Accelerate's own layout) the way
    the manager's remote tier downloads a step: once per node under a file lock, into a
    temporary directory renamed into place, sizes checked."""
    import shutil
    import uuid

    import filelock

    local_root.mkdir(parents=True, exist_ok=True)
    final = local_root / name
    with filelock.FileLock(local_root / f".{name}.download.lock"):
        if final.is_dir():
            return final
        tmp = local_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for filename in storage.listdir(name):
                check_name(filename, f"{storage.url}/{name}")  # a listing is untrusted too
                remote_path = f"{name}/{filename}"
                storage.download(remote_path, str(tmp / filename))
                if (tmp / filename).stat().st_size != storage.size(remote_path):
                    raise OSError(f"{storage.url}/{remote_path}: incomplete download")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
