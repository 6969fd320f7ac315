"""Step directory names.

A naming scheme turns a step into a directory name and back. Names that do not parse
are not checkpoints, which is what keeps temporary directories and foreign files out of
listings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class StepNaming(Protocol):
    """Maps steps to directory names and back."""

    def name(self, step: int) -> str: ...

    def parse(self, name: str) -> int | None:
        """The step of a directory name, or None if the name is not a step directory."""
        ...


@dataclasses.dataclass(frozen=True)
class PrefixNaming:
    """``<prefix>_<step>``, the step zero-padded to ``fixed_length`` digits.

    With ``prefix=None`` the name is the bare number (Orbax's default layout). Parsing
    accepts any number of digits, so changing the padding keeps old steps visible.
    """

    prefix: str | None = "step"
    fixed_length: int | None = 8

    def name(self, step: int) -> str:
        digits = str(step).zfill(self.fixed_length or 0)
        return digits if self.prefix is None else f"{self.prefix}_{digits}"

    def parse(self, name: str) -> int | None:
        head = "" if self.prefix is None else re.escape(self.prefix) + "_"
        match = re.fullmatch(head + r"([0-9]+)", name)
        return int(match.group(1)) if match else None


def checkpoint_n_naming() -> PrefixNaming:
    """``checkpoint_<n>``: Accelerate's automatic checkpoint naming."""
    return PrefixNaming(prefix="checkpoint", fixed_length=None)


@dataclasses.dataclass(frozen=True)
class EpochIterNaming:
    """``epoch_<e>_iter_<i>`` (Helios style): the step is the global iteration ``i``.

    ``epoch_of`` tells the epoch a step belongs to; it is only needed to write names.
    """

    epoch_of: Callable[[int], int]

    def name(self, step: int) -> str:
        return f"epoch_{self.epoch_of(step)}_iter_{step}"

    def parse(self, name: str) -> int | None:
        match = re.fullmatch(r"epoch_([0-9]+)_iter_([0-9]+)", name)
        return int(match.group(2)) if match else None


@dataclasses.dataclass(frozen=True)
class ReaderNaming:
    """``preferred``'s names, and also bare numbers (Orbax) and ``checkpoint_<n>``
    (Accelerate): how a read-only manager told no naming finds the steps of a writer
    configured otherwise (an evaluation job would else wait forever, seeing nothing)."""

    preferred: StepNaming

    def name(self, step: int) -> str:
        return self.preferred.name(step)

    def parse(self, name: str) -> int | None:
        for naming in (self.preferred, PrefixNaming(None), checkpoint_n_naming()):
            step = naming.parse(name)
            if step is not None:
                return step
        return None
