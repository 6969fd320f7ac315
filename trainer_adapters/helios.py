"""Managed checkpointing and exact resume for Helios's ``Trainer`` (helios-ml 2.0).

The one-line change (every Helios argument stays as it was)::

    from trainer_adapters.helios import CheckpointedTrainer

    trainer = CheckpointedTrainer(                   # was: helios.Trainer(
        train_unit="iteration", total_steps=10_000, chkpt_frequency=500,
        chkpt_root=Path("runs/exp1/chkpt"), ...)
    trainer.fit(model, datamodule)                   # resumes from the newest checkpoint

Checkpoints go through a `CheckpointManager` in ``chkpt_root/<model.save_name>`` (or the
``manager=`` given: a manager or a directory, local or remote, with ``options=``).
``chkpt_frequency`` becomes the manager's save policy: every ``n`` optimizer steps with
``TrainingUnit.ITERATION``, at the end of every ``n``-th epoch with ``EPOCH``; rules in
``options`` (seconds, steps, preemption) are OR'ed in. The last step is always saved.
Step directories are named ``epoch_<e>_iter_<i>`` like Helios's files (`EpochIterSteps`).

Why a subclass: the defects are in Helios's training loops, which no plug-in reaches.
The loops here keep Helios's hooks, order and counters but run on `ResumableLoop`:

- Iteration mode, mid-epoch resume: Helios restarts in the *next* epoch's shuffle and,
  as ``sampler.start_iter`` is never reset, skips the same batches in every later epoch.
  Here the resumed epoch is the same epoch, and only it is shortened.
- A checkpoint exactly at an epoch end stored ``dataset_iter == len(loader)``, so the
  resumed Helios run loops over empty epochs forever. Here counters roll over first.
- Making the epoch's iterator draws the data loader's base seed from the global torch
  RNG; Helios resumes with the checkpoint's RNG, so dropout and worker seeds drift. Here
  the epoch-start RNG is replayed (Helios's NumPy generator included) and every later
  draw is bit-for-bit that of an uninterrupted run.

Helios 2.0's private methods are overridden (``_load_checkpoint``, ``_save_checkpoint``,
``_train_on_iteration``, ``_train_on_epoch``); other versions warn at import.
Several processes: every rank opens the manager, which coordinates them through
torch.distributed (the replicated state is written once, by rank 0); every rank restores
rank 0's state, as in Helios. Untested here: Helios runs distributed on GPUs only.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, cast

import helios
import torch
import tqdm
from helios import core
from helios.core import loggers, rng
from helios.model import BatchPhase
from helios.trainer import Trainer, TrainingState

from checkpointing import (
    AnyOf,
    AtSteps,
    CheckpointManager,
    CheckpointManagerOptions,
    EpochIterNaming,
    SaveContext,
)
from checkpointing.options import configured_save_rules
from trainer_adapters.loop import Progress, ResumableLoop, TrainingUnit

__all__ = ["CheckpointedTrainer", "EpochIterSteps", "HeliosFrequency"]

if not str(helios.__version__).startswith("2.0."):
    warnings.warn(
        f"trainer_adapters.helios is written for helios-ml 2.0, found {helios.__version__}",
        stacklevel=2,
    )


class EpochIterSteps:
    """``epoch_<e>_iter_<i>`` step directories; the step is the optimizer iteration ``i``.

    `EpochIterNaming` needs the epoch of any step, and a Helios epoch is no function of
    the step (accumulation windows cross epochs, phases change the loader). So epochs are
    remembered: from every name parsed (the directory, a mirror) and from each save.
    """

    def __init__(self) -> None:
        self._epochs: dict[int, int] = {}
        self._format = EpochIterNaming(epoch_of=self.epoch_of)

    def epoch_of(self, step: int) -> int:
        """The epoch remembered for ``step`` (0 if none: no such directory exists)."""
        return self._epochs.get(step, 0)

    def remember(self, step: int, epoch: int) -> None:
        self._epochs[step] = epoch

    def name(self, step: int) -> str:
        return self._format.name(step)

    def parse(self, name: str) -> int | None:
        step = self._format.parse(name)
        if step is not None:
            self._epochs.setdefault(step, int(name.split("_")[1]))
        return step


class HeliosFrequency:
    """Save policy for Helios's ``chkpt_frequency``: every ``n`` optimizer steps
    (ITERATION), or the step that ends every ``n``-th epoch (EPOCH; read from the loop's
    progress, since an epoch end is not a property of the step number)."""

    def __init__(self, unit: TrainingUnit, n: int, progress: Callable[[], Progress]) -> None:
        if n < 1:
            raise ValueError(f"chkpt_frequency must be >= 1, got {n}")
        self.unit, self.n, self.progress = unit, n, progress

    def due(self, step: int) -> bool:
        if self.unit is TrainingUnit.ITERATION:
            return step % self.n == 0
        p = self.progress()
        return step == p.step and p.batch == 0 and p.epoch > 0 and p.epoch % self.n == 0

    def should_save(self, ctx: SaveContext) -> bool:
        return self.due(ctx.step)


class _HeliosNumpyRNG:
    """Helios's default NumPy generator (PCG64), which it seeds and checkpoints beside the
    global RNGs, shown to `ResumableLoop` as a generator so its epoch-start state is
    replayed too. Looked up on each use: ``seed_rngs`` replaces it."""

    def get_state(self) -> dict[str, Any]:
        return dict(rng.get_default_numpy_rng().bit_generator.state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        rng.get_default_numpy_rng().bit_generator.state = dict(state)


class CheckpointedTrainer(Trainer):  # type: ignore[misc]
    """``helios.Trainer`` whose checkpoints go through a `CheckpointManager` and whose
    resume is exact. See the module docstring.

    ``manager``: a manager (used as is, not closed), or a directory (default:
    ``chkpt_root/<save_name>``) opened with ``options``. Every other argument is Helios's.
    """

    def __init__(
        self,
        *args: Any,
        manager: CheckpointManager | str | os.PathLike[str] | None = None,
        options: CheckpointManagerOptions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._manager_arg = manager
        self._manager_options = options
        self._manager: CheckpointManager | None = None
        self._loop = ResumableLoop(self._train_unit)
        self._resume: dict[str, Any] | None = None  # the loop state of the restored step
        self._last_saved: int | None = None
        self._state: TrainingState | None = None
        self._frequency = (
            None if self._chkpt_frequency is None else
            HeliosFrequency(self._loop.unit, self._chkpt_frequency, self._current_progress)
        )  # a bound method, not a lambda: Helios pickles the trainer for its spawned ranks

    # ------------------------------------------------------------------ public

    @property
    def manager(self) -> CheckpointManager | None:
        """The manager of the current (or last) ``fit``; None without a directory."""
        return self._manager

    @property
    def progress(self) -> Progress:
        """Epochs, batches of the epoch and optimizer steps done."""
        return self._loop.progress

    def _current_progress(self) -> Progress:
        return self._loop.progress

    @property
    def training_state(self) -> TrainingState | None:
        """Helios's counters of the current (or last) ``fit``."""
        return self._state

    # ------------------------------------------------------------------ the manager

    def _open_manager(self, *, training: bool) -> CheckpointManager | None:
        if isinstance(self._manager_arg, CheckpointManager):
            return self._manager_arg
        directory = self._manager_arg if self._manager_arg is not None else self._chkpt_root
        if directory is None:
            return None
        options = self._manager_options or CheckpointManagerOptions()
        read_only = not training
        rules = configured_save_rules(options)
        if self._frequency is not None:
            rules.insert(0, self._frequency)
        policy = rules[0] if len(rules) == 1 else AnyOf(*rules) if rules else AtSteps(())
        options = dataclasses.replace(
            options,
            save_policy=policy,
            step_naming=options.step_naming or EpochIterSteps(),
            read_only=read_only or options.read_only,
            save_on_preemption=options.save_on_preemption and not read_only,
        )
        return CheckpointManager(directory, options)

    def _owns_manager(self) -> bool:
        return self._manager is not None and self._manager is not self._manager_arg

    def _close_manager(self, *, unwinding: bool = False) -> None:
        """Close a manager this trainer opened, else wait for its writes. While an
        exception unwinds, a failed save is logged rather than raised over it."""
        if self._manager is None:
            return
        try:
            if self._owns_manager():
                self._manager.close()
            else:
                self._manager.wait_until_finished()
        except Exception:
            if not unwinding:
                raise
            loggers.get_root_logger().exception("error: a checkpoint save failed")

    # ------------------------------------------------------------------ restore

    def _load_checkpoint(
        self,
        chkpt_path: Any,
        skip_rng: bool = False,
        model_for_inference: bool = False,
    ) -> TrainingState:
        """Restore the manager's newest step. Helios passes the newest ``.pth`` of
        ``helios.Trainer`` it found; it is not read (different counters, no epoch-start
        RNG), and a warning says so when the manager has nothing to resume."""
        del skip_rng  # the RNGs are set when the training loop starts
        manager = self._manager = self._open_manager(training=not model_for_inference)
        self._resume, self._last_saved = None, None
        step = None if manager is None else manager.latest_step()
        if chkpt_path is not None and step is None:
            warnings.warn(f"{chkpt_path} was written by helios.Trainer and is not resumed "
                          f"from; CheckpointedTrainer starts afresh", stacklevel=2)
        if manager is None or step is None:
            loggers.setup_loggers(self._run_name, self._log_root)
            if model_for_inference:
                self._close_manager()
            return TrainingState()
        if model_for_inference:  # Trainer.test: the networks only, on the model's device
            restored = manager.restore(step=step, items=["model", "loggers", "training_state"])
            assert restored is not None
            self._close_manager()
            self.model.load_state_dict(
                _to_device(restored["model"], self.model.device), for_inference=True)
        else:
            target: dict[str, Any] = {
                "model": self.model, "datamodule": self.datamodule, "training_state": None,
                "loop": None, "loggers": None,
                **{f"plugin.{k}": p for k, p in self._plugins.items()},
            }
            restored = manager.restore(target, step=step)
            assert restored is not None
            self._resume, self._last_saved = restored["loop"], step
        loggers.restore_loggers(self._run_name, self._log_root,
                                _logger_states(restored["loggers"]))
        if not model_for_inference:
            message = f"Resuming training from step {step} of {manager.directory}"
            loggers.get_root_logger().info(message)
            core.distributed.global_print(f"{message}\n")
        names = {f.name for f in dataclasses.fields(TrainingState)}
        return TrainingState(**{k: v for k, v in restored["training_state"].items()
                                if k in names})

    def _start_loop(self, state: TrainingState, loader: Any) -> ResumableLoop:
        """The loop for this fit, with the restored counters; the RNGs are set when its
        first epoch begins."""
        total = self._total_steps
        self._loop = ResumableLoop(
            self._train_unit,
            None if total == float("inf") else int(total),
            generators=[cast(torch.Generator, _HeliosNumpyRNG()), *_loader_generators(loader)],
        )
        if self._resume is not None:
            self._loop.load(self._resume)
            state.dataset_iter = self._loop.progress.batch
        self._state = state
        return self._loop

    # ------------------------------------------------------------------ save

    def _checkpoint(self, state: TrainingState, *, force: bool = False) -> bool:
        """Save the current step when the policy (or ``force``) wants it and the model
        allows it. Returns whether a save happened."""
        manager, step = self._manager, self.progress.step
        if manager is None or manager.options.read_only or step in (0, self._last_saved):
            return False
        if not self.model.should_save_checkpoint():
            return False
        if not force and not manager.should_save(step):
            # A manager given by the user has its own policy; chkpt_frequency is OR'ed in.
            extra = None if self._owns_manager() else self._frequency
            if extra is None or not extra.due(step) or step <= (manager.latest_step() or 0):
                return False
        self._save_checkpoint(state)
        return True

    def _save_checkpoint(self, state: TrainingState) -> None:
        """Save the current step through the manager (the ``.pth`` writer of Helios)."""
        manager, step = self._manager, self.progress.step
        assert manager is not None
        if isinstance(manager.options.step_naming, EpochIterSteps):
            manager.options.step_naming.remember(step, state.global_epoch)
        items: dict[str, Any] = {
            "model": self.model,
            "datamodule": self.datamodule,
            "training_state": dataclasses.asdict(state),
            "loop": self._loop.state(),
            "loggers": _plain(loggers.get_logger_state_dicts()),
            **{f"plugin.{k}": p for k, p in self._plugins.items()},
        }
        metrics = {k: float(v) for k, v in self.model.metrics.items() if _is_scalar(v)}
        manager.save(
            step, items, metrics=metrics or None, force=True,
            metadata={"helios_version": helios.__version__, "epoch": state.global_epoch},
        )
        self._last_saved = step

    def _finish(self, state: TrainingState) -> None:
        """Save the last step (the policy may have skipped it) and wait for the write."""
        try:
            self._checkpoint(state, force=True)
        finally:
            self._close_manager()

    def _preempted(self) -> bool:
        return self._manager is not None and self._manager.reached_preemption(
            self.progress.step)

    # ------------------------------------------------------------------ loops

    def _begin_epoch(
        self, state: TrainingState, epoch: int, sampler: Any, dataloader: Any
    ) -> tuple[float, int | None]:
        """What both loops do as an epoch starts; returns its start time and length."""
        state.global_epoch = epoch + 1
        loggers.get_root_logger().info(f"Starting epoch {epoch + 1}")
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        self.model.on_training_epoch_start(state.global_epoch)
        return epoch_start, _length(dataloader)

    def _train_on_iteration(self, state: TrainingState) -> None:
        """Helios's iteration loop (same hooks, order and counters) on `ResumableLoop`."""
        accumulation, val_freq = self._accumulation_steps, self._valid_frequency
        print_freq, early_stop = self._print_frequency, self._early_stop_cycles
        dataloader, sampler = core.get_from_optional(self.datamodule.train_dataloader())
        loop = self._start_loop(state, dataloader)
        root_logger, timer = loggers.get_root_logger(), core.AverageTimer()
        pbar = self._overall_pbar("it", "Training iterations", state.current_iteration)
        self.model.train()
        done = False
        try:
            for epoch in loop.epochs():
                epoch_start, size = self._begin_epoch(state, epoch, sampler, dataloader)
                timer.start()
                for batch in loop.batches(dataloader):
                    state.global_iteration += 1
                    stepped = state.global_iteration % accumulation == 0
                    if stepped:
                        state.current_iteration += 1
                        state.running_iter += 1
                    self._train_batch(batch, state, timer, stepped and bool(
                        print_freq and state.current_iteration % print_freq == 0))
                    if stepped and not pbar.update():
                        pbar.refresh()
                    state.dataset_iter += 1
                    loop.advance(optimizer_stepped=stepped, end_of_epoch=state.dataset_iter == size)
                    if self._should_stop():
                        done = True
                        break
                    if stepped and loop.frequency_due(val_freq, at_epoch_end=False):
                        self._validate_and_count(state)
                    if stepped and self._checkpoint(state) and self._preempted():
                        done = True
                        break
                    if early_stop is not None and state.early_stop_count >= early_stop:
                        done = True
                        break
                    if self._should_stop() or loop.done:
                        done = True
                        break
                    if self.model.should_advance_dataset_phase():
                        self.datamodule.advance_train_phase()
                        dataloader, sampler = core.get_from_optional(
                            self.datamodule.train_dataloader())
                        break
                state.dataset_iter = 0
                self.model.on_training_epoch_end(state.global_epoch)
                root_logger.info(f"Epoch {epoch + 1} completed in "
                                 f"{time.perf_counter() - epoch_start:.2f}s")
                if done:
                    break
        except BaseException:
            self._close_manager(unwinding=True)
            raise
        self._finish(state)

    def _train_on_epoch(self, state: TrainingState) -> None:
        """Helios's epoch loop (same hooks, order and counters) on `ResumableLoop`; the
        manager's own rules (seconds, steps, preemption) may also save mid-epoch."""
        val_freq, print_freq = self._valid_frequency, self._print_frequency
        early_stop = self._early_stop_cycles
        dataloader, sampler = core.get_from_optional(self.datamodule.train_dataloader())
        loop = self._start_loop(state, dataloader)
        root_logger, timer = loggers.get_root_logger(), core.AverageTimer()
        pbar = self._overall_pbar("epoch", "Training epochs", loop.progress.epoch)
        self.model.train()
        done = False
        try:
            for epoch in loop.epochs():
                epoch_start, size = self._begin_epoch(state, epoch, sampler, dataloader)
                timer.start()
                with tqdm.tqdm(total=size, desc=f"Epoch {epoch + 1}", unit="iter",
                               disable=self._pbar_disabled(), leave=False) as epoch_pbar:
                    for batch in loop.batches(dataloader):
                        state.global_iteration += 1
                        state.current_iteration += 1
                        state.running_iter += 1
                        self._train_batch(batch, state, timer, bool(
                            print_freq and state.current_iteration % print_freq == 0))
                        state.dataset_iter += 1
                        if not epoch_pbar.update():
                            epoch_pbar.refresh()
                        end = state.dataset_iter == size
                        loop.advance(end_of_epoch=end)
                        if self._should_stop():
                            done = True
                            break
                        if not end and self._checkpoint(state) and self._preempted():
                            done = True
                            break
                state.dataset_iter = 0
                if val_freq is not None and state.global_epoch % val_freq == 0:
                    self._validate_and_count(state)
                if self._checkpoint(state) and self._preempted():
                    done = True
                self.model.on_training_epoch_end(state.global_epoch)
                if not done and self.model.should_advance_dataset_phase():
                    self.datamodule.advance_train_phase()
                    dataloader, sampler = core.get_from_optional(
                        self.datamodule.train_dataloader())
                root_logger.info(f"Epoch {epoch + 1} completed in "
                                 f"{time.perf_counter() - epoch_start:.2f}s")
                pbar.update()
                if early_stop is not None and state.early_stop_count >= early_stop:
                    done = True
                if done or self._should_stop():
                    break
        except BaseException:
            self._close_manager(unwinding=True)
            raise
        self._finish(state)

    # ------------------------------------------------------------------ loop parts

    def _train_batch(
        self, batch: Any, state: TrainingState, timer: Any, should_log: bool
    ) -> None:
        batch = self.model.batch_to_device(batch, BatchPhase.TRAIN)
        batch = self._plugins_process_batch("training", batch, state=state)
        self.model.on_training_batch_start(state)
        self.model.train_step(batch, state)
        timer.record()
        state.average_iter_time = timer.get_average_time()
        self.model.on_training_batch_end(state, should_log=should_log)

    def _validate_and_count(self, state: TrainingState) -> None:
        self._validate(state.validation_cycles)
        state.validation_cycles += 1
        state.running_iter = 0
        if self.model.have_metrics_improved():
            state.early_stop_count = 0
        else:
            state.early_stop_count += 1

    def _should_stop(self) -> bool:
        return bool(self._plugins_should_training_stop() or self.model.should_training_stop())

    def _overall_pbar(self, unit: str, desc: str, initial: int) -> tqdm.tqdm[Any]:
        total = self._total_steps
        return tqdm.tqdm(total=None if total == float("inf") else total, unit=unit, desc=desc,
                         disable=self._pbar_disabled(), initial=initial)

    def _pbar_disabled(self) -> bool:
        return bool((self._is_distributed and self.rank != 0) or not self._enable_progress_bar)


# ---------------------------------------------------------------------- helpers


def _length(loader: Any) -> int | None:
    """Batches per epoch, or None when the loader cannot tell (the loop then rolls the
    epoch over when the loader ends)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """Generators that shuffle outside the global RNG (a user's sampler or loader)."""
    found: dict[int, torch.Generator] = {}
    for g in (getattr(loader, "generator", None),
              getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, int | float) and not isinstance(value, bool)


_PATH = "__path__"  # marks a pathlib value of a logger state (stored as text)


def _plain(value: Any) -> Any:
    """Logger states hold paths, which a checkpoint stores as tagged strings."""
    if isinstance(value, PurePath):
        return {_PATH: str(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _logger_states(value: Any) -> Any:
    from pathlib import Path

    if isinstance(value, Mapping):
        if set(value) == {_PATH}:
            return Path(value[_PATH])
        return {k: _logger_states(v) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value

