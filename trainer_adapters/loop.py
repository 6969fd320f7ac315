"""A framework-neutral epoch/iteration loop that resumes exactly where it stopped.

What a bit-exact resume needs beyond the model and optimizer, and what trainers get wrong:

- Counters that are saved *after* they count the step that produced the checkpoint (a
  checkpoint of step ``s`` means "``s`` optimizer steps done"), so a resumed run neither
  repeats nor skips a step.
- At an epoch end the counters roll over to ``(epoch + 1, batch 0)`` before the save, so a
  resume starts the next epoch instead of repeating (or hanging in) the finished one.
- A mid-epoch resume must see the rest of *the same* epoch: the shuffle and the data
  loader's base-seed draw come from the RNG as it was when the epoch's iterator was
  created. `ResumableLoop` keeps that "epoch-start" RNG, and on resume restores it,
  creates the iterator, draws and drops the consumed batches, then restores the RNG of
  the checkpoint, so every later random draw (dropout, next epochs) is identical too.

Usage in any hand-written loop::

    loop = ResumableLoop(TrainingUnit.ITERATION, total=10_000)
    loop.load(manager.restore(...)["loop"])          # when resuming
    for epoch in loop.epochs():
        for batch in loop.batches(train_loader):
            ...                                      # forward, backward, optimizer.step()
            if loop.advance(end_of_epoch=...):       # counts; True when the run is done
                break
            manager.save(loop.progress.step, {..., "loop": loop.state()})
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class TrainingUnit(enum.Enum):
    """What ``total`` and a checkpoint frequency count: optimizer steps or epochs."""

    ITERATION = 0
    EPOCH = 1

    @classmethod
    def parse(cls, value: TrainingUnit | str | enum.Enum) -> TrainingUnit:
        """Accepts this enum, another enum with the same names (Helios's), or a string."""
        name = value.name if isinstance(value, enum.Enum) else str(value)
        return cls[name.upper()]


@dataclasses.dataclass
class Progress:
    """Where the run is. ``step`` optimizer steps are done; ``batch`` batches of ``epoch``
    were consumed (micro-batches when accumulating gradients)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))


def capture_rng(generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's (and CUDA's) global RNGs and of
    ``generators`` (samplers' own generators), in a form the manager stores exactly."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: Sequence[torch.Generator] = ()) -> None:
    """Set the RNGs back to a `capture_rng` state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        raise ValueError(
            f"the checkpoint has {len(saved)} data generator states, this run has "
            f"{len(generators)}: the data loaders differ from the checkpointed run"
        )
    for generator, g_state in zip(generators, saved, strict=True):
        generator.set_state(g_state)


class ResumableLoop:
    """Counters, stop condition and exact mid-epoch resume for an epoch/iteration loop.

    ``unit``/``total``: train for ``total`` optimizer steps (ITERATION) or epochs (EPOCH).
    ``generators``: torch generators that shuffle data outside the global RNG (a sampler's
    own ``generator``); their epoch-start states are replayed like the global RNGs.
    """

    def __init__(
        self,
        unit: TrainingUnit | str = TrainingUnit.ITERATION,
        total: int | None = None,
        *,
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        self.unit = TrainingUnit.parse(unit)
        self.total = total
        self.generators = list(generators)
        self.progress = Progress()
        self._epoch_rng: dict[str, Any] | None = None  # RNG when this epoch's iterator began
        self._resume_rng: dict[str, Any] | None = None  # RNG to set once batches are skipped

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this loop exactly (take it after `advance`)."""
        now = capture_rng(self.generators)
        return {
            "progress": self.progress.state_dict(),
            "rng": now,
            # At batch 0 the next epoch's iterator is not made yet: it starts from `rng`.
            "epoch_rng": now if self.progress.batch == 0 else self._epoch_rng,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Resume from a `state`: counters now, RNGs when `batches` replays the epoch."""
        self.progress.load_state_dict(state["progress"])
        if self.progress.batch == 0:
            restore_rng(state["rng"], self.generators)
            self._epoch_rng = self._resume_rng = None
        else:
            self._epoch_rng, self._resume_rng = state["epoch_rng"], state["rng"]

    # ------------------------------------------------------------------ driving

    @property
    def done(self) -> bool:
        if self.total is None:
            return False
        done = self.progress.step if self.unit is TrainingUnit.ITERATION else self.progress.epoch
        return done >= self.total

    def epochs(self) -> Iterator[int]:
        """Epoch numbers from the resumed one until the run is done."""
        while not self.done:
            epoch = self.progress.epoch
            yield epoch
            if self.progress.epoch == epoch and not self.done:
                # The loader ended without `advance(end_of_epoch=True)` (unknown length).
                self.end_epoch()

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        """The batches of the current epoch: all of them, or after a mid-epoch resume the
        ones the checkpointed run had not consumed yet, in its order."""
        skip = self.progress.batch
        if self._resume_rng is not None:
            assert self._epoch_rng is not None
            restore_rng(self._epoch_rng, self.generators)
        else:
            self._epoch_rng = capture_rng(self.generators)
        iterator = iter(loader)
        if skip:
            # Draw and drop: workers, samplers and random transforms advance as before.
            for _ in itertools.islice(iterator, skip):
                pass
        if self._resume_rng is not None:
            restore_rng(self._resume_rng, self.generators)
            self._resume_rng = None
        # Stop after the last batch rather than exhaust the iterator: a sampler may draw
        # from its generator once it is exhausted (torch's RandomSampler does), which a
        # checkpoint taken at the epoch's last batch never sees, so a run resumed from it
        # would shuffle the next epoch otherwise.
        length = _length(loader)
        yield from iterator if length is None else itertools.islice(iterator, length - skip)

    def advance(self, *, optimizer_stepped: bool = True, end_of_epoch: bool = False) -> bool:
        """Count one consumed batch (and an optimizer step, unless accumulating); roll over
        to the next epoch at its end. Returns `done`."""
        self.progress.batch += 1
        if optimizer_stepped:
            self.progress.step += 1
        if end_of_epoch:
            self.end_epoch()
        return self.done

    def end_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch = 0
        self._epoch_rng = None

    def frequency_due(self, frequency: int | None, *, at_epoch_end: bool) -> bool:
        """Whether a per-``unit`` ``frequency`` (checkpoint, validation) is due right after
        `advance`: every ``frequency`` steps, or at the end of every ``frequency``-th epoch."""
        if not frequency:
            return False
        if self.unit is TrainingUnit.ITERATION:
            return self.progress.step % frequency == 0
        return at_epoch_end and self.progress.epoch % frequency == 0


def _length(loader: Iterable[Any]) -> int | None:
    """The number of batches of ``loader``, if it says (an iterable dataset may not)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
