"""Helper threads: one background job at a time, and the parallel map."""

from __future__ import annotations

import threading

import pytest

from checkpointing.errors import CheckpointError
from checkpointing.fastio.threads import JobRunner, parallel_map


def test_pending_step_does_not_depend_on_the_job_timing() -> None:
    """Set from start until waited for, finished or not: a distributed manager decides
    on it, and its processes' background threads finish at different times."""
    writer = JobRunner("save")
    writer.start(7, lambda abandoned: None, None)
    writer.join()
    assert not writer.busy and writer.pending_step == 7
    writer.wait()
    assert writer.pending_step is None


def test_a_job_past_its_deadline_is_abandoned_and_told_so() -> None:
    release = threading.Event()
    seen: list[bool] = []
    runner = JobRunner("upload")
    runner.start(3, lambda abandoned: (release.wait(10), seen.append(abandoned())), 0.05)
    with pytest.raises(CheckpointError, match="background upload of step 3 did not finish"):
        runner.wait()
    release.set()
    runner.join()
    assert seen in ([], [True])


def test_a_failure_is_raised_once_with_a_note() -> None:
    runner = JobRunner("save")

    def fail(abandoned: object) -> None:
        raise OSError("disk gone")

    runner.start(5, fail, None)
    with pytest.raises(OSError, match="disk gone") as info:
        runner.wait()
    assert "background save of step 5" in "".join(getattr(info.value, "__notes__", []))
    runner.wait()  # once


def test_parallel_map_keeps_order_and_raises_the_first_error() -> None:
    assert parallel_map(lambda x: x * x, list(range(20)), 4) == [x * x for x in range(20)]

    def boom(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    with pytest.raises(ValueError, match="seven"):
        parallel_map(boom, list(range(20)), 4)
