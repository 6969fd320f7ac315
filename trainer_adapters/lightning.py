"""Managed checkpointing and exact resume for PyTorch Lightning's ``Trainer``.

``ManagedCheckpoint`` is a Lightning ``Checkpoint`` callback that saves the trainer's own
checkpoint dict (the one ``ModelCheckpoint`` writes: module, optimizers, LR schedulers,
loops' progress, callbacks' and the datamodule's state) through a `CheckpointManager`,
and makes the next ``trainer.fit`` resume from the manager's newest step::

    ckpt = ManagedCheckpoint("runs/exp1/ckpt", CheckpointManagerOptions(save_interval_steps=500))
    trainer = Trainer(callbacks=[ckpt], max_epochs=10)
    trainer.fit(model, datamodule)       # resumes from the latest step, if there is one

Why Lightning's ``ckpt_path`` resume is not exact, and what this adds:

- Lightning restores counters and loops exactly, but a data loader that has no
  ``state_dict`` (a plain ``DataLoader``) restarts a resumed epoch with a *new* shuffle and
  serves its first batches again. Nor does the checkpoint hold the RNG states, so dropout
  and the next epochs' shuffles differ too.
- What exactness needs is `trainer_adapters.loop`'s recipe: keep the RNG states of the
  moment each epoch's data iterator is created ("epoch-start RNG"); on a mid-epoch resume,
  set them, create the iterator, draw and drop the batches already trained on, then set
  the checkpoint's RNG states. This callback keeps both states in its ``state_dict`` (so
  they travel in Lightning's checkpoint dict) and does the replay in ``on_train_start``,
  the last hook before the first batch is fetched. Lightning creates the first iterator
  of a ``fit`` before any callback hook, so that hook re-creates it in a fresh run too:
  every first epoch then starts from a state this callback captured.
- An epoch's last step is saved once the epoch is over (``on_train_epoch_end``, after
  the module's hook and any validation): those may draw random numbers, which the
  checkpoint's RNG states then include. The last step of the run is saved at
  ``on_train_end``, after the epoch-wise LR schedulers stepped.

The checkpoint is untrusted input, so nothing is pickled: the manager stores tensors
and plain values (safetensors + JSON), and resuming hands Lightning the restored dict
(the manager's restore, never ``torch.load``). A value the format cannot hold (an
arbitrary object in a callback's state or in ``on_save_checkpoint``) fails the save with
`UnsupportedTypeError` naming its path. The one exception is the hyperparameters
(``save_hyperparameters``): a resumed ``fit`` never reads them (the module exists
already), so hyperparameters the format refuses are dropped from the checkpoint with a
warning instead.

Lightning internals used, all stable since Lightning 2.0: the checkpoint connector's
``dump_checkpoint`` (what ``trainer.save_checkpoint`` writes) and ``_loaded_checkpoint``
(what ``ckpt_path`` fills), and the fit loop's data fetcher (to re-create the iterator).
Scope: one process. Several (DDP) would need each process's RNG states saved apart.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import UnsupportedTypeError
from checkpointing.format.tree import flatten
from trainer_adapters.extras import require
from trainer_adapters.loop import capture_rng, restore_rng

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Checkpoint
except ImportError:
    require("lightning.pytorch", "lightning")  # raises, naming the extra to install
    raise

logger = logging.getLogger("trainer_adapters")

__all__ = ["ManagedCheckpoint"]

# Hyperparameters are kept when the format can hold them; a resumed fit never reads them.
_HPARAMS = ("hyper_parameters", "datamodule_hyper_parameters")


class ManagedCheckpoint(Checkpoint):
    """Saves a Lightning run through a `CheckpointManager` and resumes it exactly.

    ``directory``: the manager's directory (or URL), or an open manager (which this
    callback then never closes). ``options`` and ``manager_kwargs`` (``remote=``,
    ``on_commit=``, ...) open the manager. Saves follow the manager's save policy, at the
    trainer's ``global_step`` (optimizer steps done); the last step of a ``fit`` is always
    saved. ``fit`` resumes from the manager's newest step (local or remote); start a new
    run in a new directory. A ``ckpt_path`` given to ``fit`` replaces that resume (its
    file is Lightning's, loaded by Lightning, without this callback's exactness).

    It replaces ``ModelCheckpoint``: Lightning adds none while this callback is in
    ``callbacks`` (leave ``enable_checkpointing`` at True), and ``fit`` raises ValueError
    if one is there too.
    """

    def __init__(
        self,
        directory: CheckpointManager | str | os.PathLike[str],
        options: CheckpointManagerOptions | None = None,
        **manager_kwargs: Any,
    ) -> None:
        self._owns_manager = not isinstance(directory, CheckpointManager)
        self._manager: CheckpointManager | None = (
            directory if isinstance(directory, CheckpointManager) else None
        )
        self._directory = directory
        self._options = options
        self._manager_kwargs = manager_kwargs
        self.restored_step: int | None = None  # the step the last fit resumed from
        self.last_saved: int | None = None
        self._steps_seen = 0  # global_step at the previous batch end: did this batch step?
        self._batches = 0  # batches of the current epoch trained on
        self._epoch_rng: dict[str, Any] | None = None  # RNG when its iterator was created
        self._iterator_made = False  # on_train_start made the current epoch's iterator
        self._resume_state: dict[str, Any] | None = None  # loaded, replayed at train start
        self._fetcher: Any = None  # the fit loop's data fetcher, during fit
        self._dropped_warned: set[str] = set()

    @property
    def manager(self) -> CheckpointManager:
        if self._manager is None:
            assert not isinstance(self._directory, CheckpointManager)
            self._manager = CheckpointManager(
                self._directory, self._options, **self._manager_kwargs
            )
        return self._manager

    # ------------------------------------------------------------------ fit start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [cb for cb in trainer.checkpoint_callbacks if cb is not self]
        if others:
            raise ValueError(
                f"ManagedCheckpoint replaces Lightning's checkpointing, but the trainer also "
                f"has {', '.join(type(cb).__name__ for cb in others)}: remove it from "
                f"callbacks (the manager's options set when to save and what to keep)"
            )
        if trainer.world_size > 1:
            raise NotImplementedError(
                "ManagedCheckpoint supports one process: under DDP each process's RNG "
                "states would have to be saved apart"
            )
        self.restored_step = None
        step = self.manager.latest_step()
        if step is not None:
            restored = self.manager.restore(step=step)
            assert restored is not None
            # What fit(ckpt_path=...) would have loaded: Lightning restores the module,
            # callbacks (this one's `load_state_dict` included), optimizers, schedulers
            # and loops from it in its usual order. A ckpt_path given to fit replaces it.
            trainer._checkpoint_connector._loaded_checkpoint = restored
            self.restored_step = self.last_saved = step
            logger.info("resuming from step %d of %s", step, self.manager.directory)

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng(self._generators)
        return {
            "batches": self._batches,
            "rng": rng,
            # At batch 0 the next epoch's iterator is not made yet: it starts from `rng`.
            "epoch_rng": rng if self._batches == 0 else self._epoch_rng,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """(Re)create the current epoch's iterator from the epoch-start RNG and skip what a
        resumed checkpoint had consumed."""
        self._fetcher = trainer.fit_loop._data_fetcher
        self._steps_seen = trainer.global_step
        state, self._resume_state = self._resume_state, None
        if state is None:
            self._batches, self._epoch_rng = 0, capture_rng(self._generators)
        else:
            self._batches, self._epoch_rng = int(state["batches"]), state["epoch_rng"]
            restore_rng(self._epoch_rng, self._generators)
        fetcher = self._fetcher
        iter(fetcher)  # Lightning's own start of an epoch's iterator
        if self._batches:
            # Lightning sets a (distributed) sampler's epoch only after this hook.
            for loader in fetcher.combined_loader.flattened:
                inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
                for sampler in (getattr(loader, "sampler", None), inner):
                    if callable(set_epoch := getattr(sampler, "set_epoch", None)):
                        set_epoch(trainer.current_epoch)
            for _ in range(self._batches):  # draw and drop
                next(fetcher)
            # Lightning adds the consumed batches to the fetcher's count itself.
            fetcher.fetched -= self._batches
            assert state is not None
            restore_rng(state["rng"], self._generators)
        self._iterator_made = True

    @property
    def _generators(self) -> list[torch.Generator]:
        """Generators that shuffle the training data outside the global RNG."""
        if self._fetcher is None:
            return []
        found: dict[int, torch.Generator] = {}
        for loader in self._fetcher.combined_loader.flattened:
            sampler = getattr(loader, "sampler", None)
            for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None)):
                if isinstance(g, torch.Generator):
                    found.setdefault(id(g), g)
        return list(found.values())

    # ------------------------------------------------------------------ saving

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._iterator_made:  # Lightning creates this epoch's iterator next
            self._batches, self._epoch_rng = 0, capture_rng(self._generators)
        self._iterator_made = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batches += 1
        stepped = trainer.global_step != self._steps_seen  # not between accumulation steps
        self._steps_seen = trainer.global_step
        if stepped and self._batches < trainer.num_training_batches:
            self._save(trainer, force=False)  # an epoch's last step: at its end

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches >= trainer.num_training_batches:  # not when max_steps cut it short
            self._batches, self._epoch_rng = 0, None
        self._iterator_made = False
        self._save(trainer, force=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, force=True)
        self.manager.wait_until_finished()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # Lightning calls no teardown hook then

    def _release(self) -> None:
        """The end of a fit: finish the saves; close the manager this callback opened."""
        self._fetcher = None
        if self._owns_manager:
            self.close()
        elif self._manager is not None:
            self._manager.wait_until_finished()

    def _save(self, trainer: pl.Trainer, *, force: bool) -> None:
        step = trainer.global_step
        if step == self.last_saved or not (force or self.manager.should_save(step)):
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        metrics = {
            name: value.item()
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1
        }
        self.manager.save(step, self._storable(checkpoint), metrics=metrics, force=True)
        self.last_saved = step

    def _storable(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint, less hyperparameters the format cannot hold (see the module
        docstring); anything else it cannot hold fails the save."""
        for key in _HPARAMS:
            if key not in checkpoint:
                continue
            try:
                flatten({key: checkpoint[key]})
            except UnsupportedTypeError as e:
                if key not in self._dropped_warned:
                    self._dropped_warned.add(key)
                    logger.warning("not saving %s (a resumed fit does not need them): %s", key, e)
                checkpoint = {k: v for k, v in checkpoint.items() if k != key}
        return checkpoint

    # ------------------------------------------------------------------ helpers

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed (and mirrored)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish the saves and close the manager; the next ``fit`` opens it again."""
        if self._manager is not None:
            self._manager.close()
            if self._owns_manager:
                self._manager = None

    def __repr__(self) -> str:
        return f"ManagedCheckpoint({self._directory!r})"

