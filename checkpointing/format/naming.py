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
    """Maps steps to directory names and back.

    Pass one as ``CheckpointManagerOptions(step_naming=...)``. ``parse`` must invert
    ``name``, and reject every other name: what it accepts is listed as a checkpoint.
    """

    def name(self, step: int) -> str:
        """The directory name of a step.

        Args:
            step: A step number, >= 0.

        Returns:
            A single path component (no ``/``, not starting with ``.``).
        """
        ...

    def parse(self, name: str) -> int | None:
        """The step of a directory name.

        Args:
            name: A name found in the checkpoint directory.

        Returns:
            The step, or None if the name is not a step directory.
        """
        ...


@dataclasses.dataclass(frozen=True)
class PrefixNaming:
    """``<prefix>_<step>``, the step zero-padded to ``fixed_length`` digits.

    With ``prefix=None`` the name is the bare number (Orbax's default layout). Parsing
    accepts any number of digits, so changing the padding keeps old steps visible.

    Attributes:
        prefix: The name's prefix, before an underscore; None for bare numbers.
        fixed_length: The digits new names are zero-padded to; None for no padding.
    """

    prefix: str | None = "step"
    fixed_length: int | None = 8

    def name(self, step: int) -> str:
        """``<prefix>_<padded step>`` (see `StepNaming.name`)."""
        digits = str(step).zfill(self.fixed_length or 0)
        return digits if self.prefix is None else f"{self.prefix}_{digits}"

    def parse(self, name: str) -> int | None:
        """The step of ``<prefix>_<digits>``, any padding (see `StepNaming.parse`)."""
        head = "" if self.prefix is None else re.escape(self.prefix) + "_"
        match = re.fullmatch(head + r"([0-9]+)", name)
        return int(match.group(1)) if match else None


def checkpoint_n_naming() -> PrefixNaming:
    """``checkpoint_<n>``: Accelerate's automatic checkpoint naming.

    Returns:
        The naming, for ``CheckpointManagerOptions(step_naming=...)``.
    """
    return PrefixNaming(prefix="checkpoint", fixed_length=None)


@dataclasses.dataclass(frozen=True)
class EpochIterNaming:
    """``epoch_<e>_iter_<i>`` (Helios style): the step is the global iteration ``i``.

    Attributes:
        epoch_of: The epoch a step belongs to; only needed to write names.
    """

    epoch_of: Callable[[int], int]

    def name(self, step: int) -> str:
        """``epoch_<epoch_of(step)>_iter_<step>`` (see `StepNaming.name`)."""
        return f"epoch_{self.epoch_of(step)}_iter_{step}"

    def parse(self, name: str) -> int | None:
        """The iteration of ``epoch_<e>_iter_<i>`` (see `StepNaming.parse`)."""
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
