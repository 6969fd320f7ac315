"""A clock the tests move by hand, and a save policy driven by it as the manager would."""

from __future__ import annotations

from checkpointing.policies import SaveContext, SavePolicy, decide_save


class FakeClock:
    """Seconds that pass only when a test says so; a manager's ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


def run(
    policy: SavePolicy,
    steps: range,
    clock: FakeClock,
    secs_per_step: float = 1.0,
    preempt_at: int | None = None,
) -> list[int]:
    """Drive a policy the way the manager does; every save commits instantly."""
    saved: list[int] = []
    last_time: float | None = None
    for step in steps:
        c = SaveContext(
            step=step,
            latest_step=saved[-1] if saved else None,
            last_save_time=last_time,
            now=clock.now,
            preempted=preempt_at is not None and step >= preempt_at,
        )
        if decide_save(policy, c):
            saved.append(step)
            last_time = clock.now
        clock.advance(secs_per_step)
    return saved
