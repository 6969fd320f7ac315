"""`trainer_adapters.loop.ResumableLoop`: counters, epoch roll-over and a mid-epoch resume
that replays the same data order and random draws, without any trainer around it."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer_adapters.loop import ResumableLoop, TrainingUnit


def _loader(generator: torch.Generator) -> DataLoader[Any]:
    data = TensorDataset(torch.arange(10.0))
    return DataLoader(data, batch_size=2, shuffle=True, generator=generator)


def _run(total: int, stop_after: int | None = None, resume: dict[str, Any] | None = None):
    """(batches seen, random draws after each, the loop's state when stopped)."""
    torch.manual_seed(0)
    random.seed(0)
    generator = torch.Generator().manual_seed(1)
    loop = ResumableLoop(TrainingUnit.ITERATION, total, generators=[generator])
    if resume is not None:
        loop.load(resume)
    seen, draws = [], []
    for _ in loop.epochs():
        for (batch,) in loop.batches(_loader(generator)):
            seen.append(batch.tolist())
            draws.append((torch.rand(1).item(), random.random()))
            end = loop.progress.batch + 1 == 5  # 10 items, batches of 2
            if loop.advance(end_of_epoch=end):
                return seen, draws, loop.state()
            if stop_after is not None and loop.progress.step == stop_after:
                return seen, draws, loop.state()
    return seen, draws, loop.state()


def test_a_mid_epoch_resume_replays_the_same_batches_and_draws() -> None:
    full, full_draws, _ = _run(total=12)
    first, first_draws, state = _run(total=12, stop_after=7)  # epoch 1, batch 2
    assert state["progress"] == {"epoch": 1, "batch": 2, "step": 7}
    rest, rest_draws, _ = _run(total=12, resume=state)
    assert first + rest == full
    assert first_draws + rest_draws == full_draws


def test_a_resume_at_an_epoch_end_starts_the_next_epoch() -> None:
    full, _, _ = _run(total=10)
    first, _, state = _run(total=10, stop_after=5)
    assert state["progress"] == {"epoch": 1, "batch": 0, "step": 5}
    rest, _, _ = _run(total=10, resume=state)
    assert first + rest == full and len(rest) == 5


def test_counters_and_frequencies() -> None:
    loop = ResumableLoop("epoch", total=2)
    assert loop.unit is TrainingUnit.EPOCH and not loop.done
    loop.advance(optimizer_stepped=False)  # accumulating: a batch, no step
    assert (loop.progress.batch, loop.progress.step) == (1, 0)
    loop.advance(end_of_epoch=True)
    assert loop.frequency_due(1, at_epoch_end=True)
    assert not loop.frequency_due(None, at_epoch_end=True)
    loop.end_epoch()
    assert loop.done and loop.progress.epoch == 2
    steps = ResumableLoop(TrainingUnit.ITERATION)
    steps.advance()
    steps.advance()
    assert steps.frequency_due(2, at_epoch_end=False) and not steps.done
