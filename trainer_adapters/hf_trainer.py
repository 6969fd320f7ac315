"""Managed checkpointing and exact resume for Hugging Face ``transformers.Trainer``.

::

    ckpt = CheckpointCallback("runs/exp/ckpt", CheckpointManagerOptions(
        save_interval_steps=100, max_to_keep=3), remote="s3://bucket/exp/ckpt")
    args = TrainingArguments(..., save_strategy="no")   # checkpoints are the manager's
    trainer = Trainer(model, args, train_dataset=train, callbacks=[ckpt])
    ckpt.train(trainer)           # resumes from the newest checkpoint, if there is one

`CheckpointCallback` saves the model, optimizer, LR scheduler (and grad scaler), the
``TrainerState`` as JSON and the RNG states through a `CheckpointManager`, on the
manager's policy (``save_interval_steps``, time, preemption...; the Trainer's
``save_steps`` is not used, so every rule of this library applies, retention, async
writes and the remote mirror included). The Trainer's own checkpointing must be off
(``save_strategy="no"``, checked): it would write a second, pickled copy.

Why `CheckpointCallback.train` and not ``trainer.train()``: a callback cannot make the
Trainer skip the batches a resumed epoch already consumed; only the Trainer's own resume
does (``_inner_training_loop`` derives the epoch and the batches to skip from
``TrainerState.global_step``). So ``train`` hands ``trainer.train`` a temporary folder
that holds nothing but ``trainer_state.json``, written from the checkpoint's validated
JSON: the Trainer takes its counters, log history and best metric from it and finds no
optimizer, scheduler, scaler or RNG file (which it skips). Everything else is restored
in place from the checkpoint at ``on_train_begin``, once the Trainer has created the
optimizer and scheduler; no file is ever unpickled. The one private hook involved:
``Trainer._load_from_checkpoint``, which insists on model weights in that folder, is
shadowed on the instance for the duration of the call (the weights arrive at
``on_train_begin`` with the rest). These are the same entry points since transformers
4.x. Calling ``trainer.train()`` directly with this callback raises instead of quietly
starting over.

When each step is saved, for a bit-exact resume (see `trainer_adapters.loop`): step
``s`` is saved once the Trainer is done with it, logging and evaluation included, that
is at the next step's ``on_step_begin``, or at the next ``on_epoch_begin`` for an
epoch's last step (an evaluation loop after the epoch moves the global RNG: starting a
DataLoader's iterator draws from it), or at ``on_train_end`` for the last. A resume
restores the RNG states where the Trainer would: at an epoch boundary before the
epoch's iterator is created; mid-epoch, the state the epoch began with before the
iterator is created (samplers that draw their shuffle from the global RNG replay it),
then, once the Trainer skipped the consumed batches and fetched the next ones, the state
of the checkpoint.

Deliberate differences from the Trainer's own checkpoints: no ``checkpoint-N`` folders
(``load_best_model_at_end`` and ``push_to_hub`` of checkpoints do not apply; keep the
best steps with the manager's ``best_metric`` retention: each save carries the numbers
logged at its step, ``eval_*`` included, as its metrics); nothing is pickled; the model
is stored as its ``state_dict`` tensors, not as a ``save_pretrained`` folder. As with
the Trainer's own resume, the first loss logged after a resume averages only the steps
since it, and a dataset that draws random numbers while loading (augmentations in the
main process) is not replayed for the skipped batches. Scope: one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import CorruptCheckpointError
from trainer_adapters.extras import require
from trainer_adapters.loop import capture_rng, restore_rng

require("transformers", "hf")  # a missing transformers is an error naming the extra

from transformers import (  # noqa: E402  (after the check above)
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState  # noqa: E402
from transformers.trainer_utils import TrainOutput  # noqa: E402

__all__ = ["CheckpointCallback"]

TRAINER_STATE_NAME = "trainer_state.json"  # the name transformers reads on resume
_ITEM = "trainer"  # the checkpoint item with the TrainerState JSON and the RNG states


class CheckpointCallback(TrainerCallback):
    """Saves a Trainer's training state through a `CheckpointManager` and resumes from it;
    start training with `train` (see the module docstring).

    ``manager``: a manager, or a directory (then ``options`` and ``manager_kwargs``, e.g.
    ``remote=``, open one; `close` closes it).
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        options: CheckpointManagerOptions | None = None,
        **manager_kwargs: Any,
    ) -> None:
        if isinstance(manager, CheckpointManager):
            self.manager = manager
        else:
            self.manager = CheckpointManager(manager, options, **manager_kwargs)
        self.last_saved: int | None = None
        self._trainer: Trainer | None = None
        self._pending: int | None = None  # a finished step, saved once its evaluation is
        self._epoch_rng: dict[str, Any] | None = None  # RNG before this epoch's iterator
        # A resume in progress: its step, the RNG states still to set (at the first
        # epoch begin, and for a mid-epoch one at the first step begin).
        self._resume_step: int | None = None
        self._rng_at_epoch: dict[str, Any] | None = None
        self._rng_at_step: dict[str, Any] | None = None

    # ------------------------------------------------------------------ driving

    def train(self, trainer: Trainer, **train_kwargs: Any) -> TrainOutput:
        """``trainer.train(**train_kwargs)``, resumed from the manager's newest checkpoint
        (local or remote) when there is one.

        Args:
            trainer: The Trainer; this callback is added to it unless it was given in
                ``callbacks=`` (give it there to order it among yours).
            **train_kwargs: For ``trainer.train`` (not ``resume_from_checkpoint``).

        Returns:
            What ``trainer.train`` returns.

        Raises:
            ValueError: The Trainer's own checkpointing is on, or several processes.
            CorruptCheckpointError: The checkpoint's TrainerState is not one this adapter
                wrote.
        """
        if "resume_from_checkpoint" in train_kwargs:
            raise TypeError(
                "CheckpointCallback.train resumes from the manager's newest checkpoint; "
                "resume_from_checkpoint is not for it"
            )
        _check_arguments(trainer.args)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        step = self.manager.latest_step()
        self._trainer, self._pending, self._epoch_rng = trainer, None, None
        try:
            if step is None:
                return trainer.train(**train_kwargs)
            state, rng = self._read_trainer_item(step)
            with tempfile.TemporaryDirectory(prefix="trainer-resume-") as folder:
                with open(os.path.join(folder, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                    json.dump(state, f)
                self._resume_step = step
                self._rng_at_epoch = rng.get("epoch_rng", rng["rng"])
                self._rng_at_step = rng["rng"] if "epoch_rng" in rng else None
                with _weights_from_callback(trainer, folder):
                    return trainer.train(resume_from_checkpoint=folder, **train_kwargs)
        finally:
            self._trainer = self._resume_step = None
            self._rng_at_epoch = self._rng_at_step = None

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed (see `CheckpointManager`)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------ events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(
                "start training with CheckpointCallback.train(trainer), not trainer.train(): "
                "only it resumes from the manager's checkpoints"
            )
        step = self._resume_step
        if step is None:
            return
        if state.global_step != step:
            raise RuntimeError(
                f"the Trainer resumed at step {state.global_step}, not at the checkpoint's "
                f"step {step}: this transformers version reads its resume folder differently"
            )
        self.manager.restore(_stateful_items(trainer), step=step)
        self.last_saved = step

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._save_pending(state, mid_epoch=False)  # the epoch before is over, evaluated
        if self._rng_at_epoch is not None:
            restore_rng(self._rng_at_epoch)
            self._rng_at_epoch = None
        self._epoch_rng = capture_rng()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._rng_at_step is not None:  # the consumed batches are skipped
            restore_rng(self._rng_at_step)
            self._rng_at_step = None
        self._save_pending(state, mid_epoch=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._pending = state.global_step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        # The epoch counter is whole exactly when the last step ended an epoch.
        mid_epoch = not float(state.epoch or 0).is_integer()
        self._pending = state.global_step
        self._save_pending(state, mid_epoch=mid_epoch, force=True)
        self.wait_until_finished()

    # ------------------------------------------------------------------ saving

    def _save_pending(self, state: TrainerState, *, mid_epoch: bool, force: bool = False) -> None:
        step, self._pending = self._pending, None
        if step is None or step == self.last_saved:
            return
        if not (force or self.manager.should_save(step)):
            return
        trainer = self._trainer
        assert trainer is not None
        trainer.store_flos()  # the FLOs counted since the last log, as the Trainer does
        rng: dict[str, Any] = {"rng": capture_rng()}
        if mid_epoch:
            assert self._epoch_rng is not None
            rng["epoch_rng"] = self._epoch_rng
        item = {"state": json.dumps(_state_json(trainer, state)), **rng}
        self.manager.save(
            step,
            {**_stateful_items(trainer), _ITEM: item},
            metrics=_logged_at(state, step),
            force=True,
        )
        self.last_saved = step

    # ------------------------------------------------------------------ loading

    def _read_trainer_item(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The TrainerState (as JSON) and the RNG states of ``step``, checked: the
        checkpoint is untrusted input, and the Trainer builds its state from the JSON."""
        where = f"{self.manager.step_directory(step)}: item {_ITEM!r}"
        item = self.manager.restore(step=step, items=[_ITEM])
        assert item is not None
        saved = item[_ITEM]
        if not (isinstance(saved, dict) and isinstance(saved.get("state"), str)
                and isinstance(saved.get("rng"), dict)):
            raise CorruptCheckpointError(f"{where}: not a Trainer checkpoint of this adapter")
        try:
            state = json.loads(saved["state"])
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}: the TrainerState is not JSON: {e}") from e
        fields = {f.name for f in dataclasses.fields(TrainerState)}
        if not isinstance(state, dict) or not state.keys() <= fields:
            raise CorruptCheckpointError(f"{where}: the TrainerState has unknown fields")
        if state.get("global_step") != step or not isinstance(state["global_step"], int):
            raise CorruptCheckpointError(
                f"{where}: the TrainerState is of step {state.get('global_step')!r}"
            )
        # A path from untrusted input must not make the Trainer load a model from it.
        state["best_model_checkpoint"] = None
        return state, {k: v for k, v in saved.items() if k in ("rng", "epoch_rng")}


# ---------------------------------------------------------------------- helpers


def _check_arguments(args: TrainingArguments) -> None:
    if args.save_strategy != "no":
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        raise ValueError(
            f"TrainingArguments(save_strategy={strategy!r}): set "
            f"save_strategy='no' with CheckpointCallback, whose manager saves on its own "
            f"policy (e.g. CheckpointManagerOptions(save_interval_steps=...)); the Trainer's "
            f"checkpoints would be a second, pickled copy"
        )
    if args.world_size > 1:
        raise ValueError(
            f"CheckpointCallback supports one process; this run has {args.world_size}"
        )


def _stateful_items(trainer: Trainer) -> dict[str, Any]:
    items: dict[str, Any] = {
        "model": trainer.model,
        "optimizer": trainer.optimizer,
        "scheduler": trainer.lr_scheduler,
    }
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        items["scaler"] = scaler
    return items


def _state_json(trainer: Trainer, state: TrainerState) -> dict[str, Any]:
    """``state`` as the Trainer writes it to ``trainer_state.json``, with the states of
    its stateful callbacks (``ExportableState``, e.g. early stopping) taken now."""
    # Typed list[TrainerCallback] in transformers; the Trainer passes its TrainerControl too.
    stateful: list[Any] = [
        cb for cb in [*trainer.callback_handler.callbacks, trainer.control]
        if isinstance(cb, ExportableState)
    ]
    out = dataclasses.asdict(state)
    out["stateful_callbacks"] = TrainerState(stateful_callbacks=stateful).stateful_callbacks
    return out


def _logged_at(state: TrainerState, step: int) -> dict[str, float | int]:
    """The numbers logged at ``step`` (loss, learning rate, ``eval_*``...): the save's
    metrics, for best-N retention and ``checkpointing ls``."""
    metrics: dict[str, float | int] = {}
    for entry in reversed(state.log_history):
        if entry.get("step") != step:
            break
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                metrics.setdefault(key, value)
    return metrics


@contextlib.contextmanager
def _weights_from_callback(trainer: Trainer, folder: str) -> Iterator[None]:
    """``trainer.train(resume_from_checkpoint=folder)`` loads model weights from
    ``folder`` first (and fails without them); ours come with the optimizer at
    ``on_train_begin``. Shadow the loader on the instance for ``folder`` only."""
    original = trainer._load_from_checkpoint

    def load(resume_from_checkpoint: str, model: Any = None) -> None:
        if os.path.realpath(resume_from_checkpoint) != os.path.realpath(folder):
            original(resume_from_checkpoint, model)

    shadowed = vars(trainer).get("_load_from_checkpoint")
    trainer._load_from_checkpoint = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        if shadowed is None:
            del trainer._load_from_checkpoint
        else:
            trainer._load_from_checkpoint = shadowed  # type: ignore[method-assign]
