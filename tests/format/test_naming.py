"""Step directory names: PrefixNaming, checkpoint_n_naming, EpochIterNaming, and how the
manager uses them to tell steps from temporary and foreign directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    EpochIterNaming,
    PrefixNaming,
    StepNaming,
    checkpoint_n_naming,
)

SYNC = {"enable_async_checkpointing": False}


def committed_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


# ------------------------------------------------------------------ PrefixNaming


def test_prefix_naming_default_is_step_and_eight_digits() -> None:
    naming = PrefixNaming()
    assert isinstance(naming, StepNaming)
    assert naming.name(100) == "step_00000100"
    assert naming.name(0) == "step_00000000"
    assert naming.name(123_456_789) == "step_123456789", "wider steps are not truncated"


def test_prefix_naming_parse_is_lenient_on_padding() -> None:
    naming = PrefixNaming()
    for name in ("step_100", "step_0100", "step_00000100", "step_000000000000100"):
        assert naming.parse(name) == 100, name
    assert naming.parse("step_0") == 0
    assert naming.parse("step_123456789") == 123_456_789


@pytest.mark.parametrize(
    "name",
    [
        ".tmp-step_1-abc",
        ".tmp-step_00000001-deadbeef",
        ".tmp-step_00000001-deleting-0badf00d",
        "step_x",
        "step_",
        "step",
        "step1",
        "steps_1",
        "Step_1",
        "step_-1",
        "step_+1",
        "step_1.5",
        "step_1e3",
        "step_1_2",
        "step_1 ",
        " step_1",
        "step_1\n",
        "step_0x10",
        "checkpoint_1",
        "checkpoint.json",
        "protected.json",
        ".lock",
        "",
    ],
)
def test_prefix_naming_rejects_foreign_names(name: str) -> None:
    assert PrefixNaming().parse(name) is None, f"{name!r} must not parse as a step"


def test_prefix_naming_rejects_non_ascii_digits() -> None:
    assert PrefixNaming().parse("step_\u0661") is None
    assert PrefixNaming(prefix=None).parse("\uff11\uff12") is None  # FULLWIDTH DIGITS 12


def test_prefix_naming_without_prefix_is_the_bare_number() -> None:
    naming = PrefixNaming(prefix=None)
    assert naming.name(100) == "00000100"
    assert naming.parse("00000100") == 100
    assert naming.parse("7") == 7
    for foreign in ("step_00000100", ".tmp-00000100-abc", "_100", "100a", ""):
        assert naming.parse(foreign) is None, foreign


def test_prefix_naming_without_padding() -> None:
    naming = PrefixNaming(fixed_length=None)
    assert naming.name(7) == "step_7"
    assert naming.name(0) == "step_0"
    assert naming.parse("step_00000007") == 7, "padded names still parse"


def test_prefix_with_regex_metacharacters_is_matched_literally() -> None:
    naming = PrefixNaming(prefix="run.v1+")
    assert naming.name(3) == "run.v1+_00000003"
    assert naming.parse("run.v1+_3") == 3
    assert naming.parse("runXv1+_3") is None, "'.' in the prefix must not match any character"
    assert naming.parse("run.v11_3") is None


@given(
    step=st.integers(min_value=0, max_value=10**15),
    prefix=st.sampled_from(["step", None, "ckpt", "a.b", "run-1"]),
    fixed_length=st.one_of(st.none(), st.integers(min_value=1, max_value=20)),
)
def test_prefix_naming_name_parse_round_trip(
    step: int, prefix: str | None, fixed_length: int | None
) -> None:
    naming = PrefixNaming(prefix=prefix, fixed_length=fixed_length)
    name = naming.name(step)
    assert naming.parse(name) == step, name
    assert len(name.rsplit("_", 1)[-1]) >= (fixed_length or 1)
    # Another padding reads the same directories (changing the option keeps old steps).
    assert PrefixNaming(prefix=prefix, fixed_length=3).parse(name) == step


@given(step=st.integers(min_value=0, max_value=10**8 - 1), other=st.integers(0, 10**8 - 1))
def test_padded_names_sort_like_steps(step: int, other: int) -> None:
    naming = PrefixNaming()
    assert (naming.name(step) < naming.name(other)) == (step < other)


# ------------------------------------------------------------ checkpoint_n_naming


def test_checkpoint_n_naming() -> None:
    naming = checkpoint_n_naming()
    assert isinstance(naming, StepNaming)
    assert naming.name(5) == "checkpoint_5"
    assert naming.name(1200) == "checkpoint_1200"
    assert naming.parse("checkpoint_12") == 12
    assert naming.parse("checkpoint_007") == 7
    for foreign in ("step_00000005", "checkpoint_", "checkpoint-5", "checkpoint_5.tmp"):
        assert naming.parse(foreign) is None, foreign


# --------------------------------------------------------------- EpochIterNaming


def test_epoch_iter_naming() -> None:
    naming = EpochIterNaming(epoch_of=lambda step: step // 1000)
    assert isinstance(naming, StepNaming)
    assert naming.name(2500) == "epoch_2_iter_2500"
    assert naming.name(0) == "epoch_0_iter_0"
    assert naming.parse("epoch_2_iter_2500") == 2500, "the step is the global iteration"
    for foreign in (
        "epoch_2_iter_x",
        "epoch__iter_5",
        "epoch_2_iter_",
        "epoch_2",
        "iter_5",
        "step_00000005",
        ".tmp-epoch_2_iter_2500-abc",
    ):
        assert naming.parse(foreign) is None, foreign


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=10**6))
def test_epoch_iter_naming_round_trip(step: int, steps_per_epoch: int) -> None:
    naming = EpochIterNaming(epoch_of=lambda s: s // steps_per_epoch)
    assert naming.parse(naming.name(step)) == step


# ------------------------------------------------------------ through the manager


@pytest.mark.parametrize(
    ("options", "expected_dir"),
    [
        ({}, "step_00000100"),
        ({"step_prefix": None}, "00000100"),
        ({"step_prefix": "ckpt", "step_format_fixed_length": 3}, "ckpt_100"),
        ({"step_naming": checkpoint_n_naming()}, "checkpoint_100"),
        ({"step_naming": EpochIterNaming(epoch_of=lambda s: s // 30)}, "epoch_3_iter_100"),
    ],
)
def test_manager_writes_and_lists_steps_by_naming(
    tmp_path: Path, options: dict[str, object], expected_dir: str
) -> None:
    opts = CheckpointManagerOptions(**SYNC, **options)  # type: ignore[arg-type]
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(100, {"x": torch.ones(2)})
    assert committed_dirs(tmp_path) == [expected_dir]
    with CheckpointManager(tmp_path, opts) as mgr:
        assert mgr.all_steps() == [100]


def test_manager_ignores_directories_its_naming_does_not_parse(tmp_path: Path) -> None:
    opts = CheckpointManagerOptions(**SYNC)  # type: ignore[arg-type]
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
    # Foreign directories, even ones holding a (garbage) commit record, are not steps.
    for foreign in ("step_x", "checkpoint_2", "notes"):
        (tmp_path / foreign).mkdir()
        (tmp_path / foreign / "checkpoint.json").write_text("garbage")
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [1]
