"""`CheckpointHook`: this library's checkpointing in robo_orchard_lab's ``HookBasedTrainer``.

    trainer = HookBasedTrainer(..., hooks=[..., CheckpointHook(manager)])

On loop start it restores the latest checkpoint (local or remote) and makes the trainer
skip what it already did; after each optimizer step it saves on the manager's policy
(never between accumulation micro-steps, never while an exception unwinds); at loop end
it saves the last step and waits for the write. The core is `AccelerateCheckpointer`.
This module needs robo_orchard_lab (an optional dependency).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from robo_orchard_core.utils.hook import HookContext
from robo_orchard_lab.pipeline.hooks.mixin import PipelineHooks

from checkpointing import CheckpointManager
from trainer_adapters.accelerate import AccelerateCheckpointer

__all__ = ["CheckpointHook"]


class CheckpointHook(PipelineHooks):  # type: ignore[misc]
    """Saves through ``manager`` and resumes from it; see the module docstring.
    ``kwargs`` go to `AccelerateCheckpointer`."""

    def __init__(self, manager: CheckpointManager | str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__()
        self._manager, self._kwargs = manager, kwargs
        self.ckpt: AccelerateCheckpointer | None = None
        self.batches = 0  # micro-batches done, the trainer's global_step_id
        self._finished = False  # resumed after the last step: train no more
        self.register_hook("on_loop", HookContext.from_callable(
            before=self._loop_start, after=self._loop_end))
        self.register_hook("on_step", HookContext.from_callable(
            before=None, after=self._step_end))

    # Saved with the replicated state: the trainer's own counter is stored before
    # its increment, so it is rebuilt from this one on resume.
    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])

    def _loop_start(self, args: Any) -> None:
        acc = args.accelerator
        self.ckpt = AccelerateCheckpointer(
            self._manager, acc, extra={"hook": self}, **self._kwargs
        )
        if self.ckpt.restore() is not None:
            progress = self.ckpt.progress
            for obj in acc._custom_objects:  # TrainerProgressState
                if type(obj).__name__ == "TrainerProgressState":
                    obj.epoch_id, obj.step_id = progress.epoch, progress.batch
                    obj.global_step_id = self.batches
                    self._finished = obj.is_training_end(args.max_step, args.max_epoch)
        _route_epochs_through(args.dataloader, self)

    def _step_end(self, args: Any) -> None:
        if sys.exc_info()[0] is not None or self.ckpt is None:
            return  # an exception is unwinding: its state is in no consistent step
        self.batches += 1
        self.ckpt.step()

    def _loop_end(self, args: Any) -> None:
        if self.ckpt is None:
            return
        if sys.exc_info()[0] is None:
            self.ckpt.finish()
            self.ckpt.close()
        else:
            self.ckpt.manager.wait_until_finished()  # what was saved still commits

    def epoch_batches(self, make_iterator: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        if self._finished:  # the trainer checks its limits only after a step
            return iter(())
        assert self.ckpt is not None
        return self.ckpt.batches(_Lazy(make_iterator))


class _Lazy:
    """An iterable whose iterator is made when asked for (after the RNG is replayed)."""

    def __init__(self, make_iterator: Callable[[], Iterator[Any]]) -> None:
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator[Any]:
        return self.make_iterator()


def _route_epochs_through(loader: Any, hook: Any) -> None:
    """Make the trainer's ``for batch in loader`` go through the hook, so that each epoch's
    start RNG is kept and a resumed epoch replays it and skips the consumed batches.

    The trainer holds the loader itself, so the class of the plain ``DataLoader`` gets an
    ``__iter__`` override: Accelerate's wrapper (whose ``__class__`` is read-only) reads
    batches from ``base_dataloader``, so that one is patched and the wrapper's device
    placement and end-of-epoch flag keep working.
    """
    target = getattr(loader, "base_dataloader", loader)
    target._checkpoint_hook = hook
    cls = type(target)
    if getattr(cls, "_checkpoint_hook_routed", False):
        return

    def __iter__(self: Any) -> Iterator[Any]:
        return self._checkpoint_hook.epoch_batches(  # type: ignore[no-any-return]
            lambda: cls.__iter__(self)
        )

    target.__class__ = type(cls.__name__, (cls,), {
        "__iter__": __iter__, "_checkpoint_hook_routed": True, "__module__": cls.__module__,
    })
