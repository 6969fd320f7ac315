"""The public API of CheckpointManager on a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from states import tiny_training_state

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    CheckpointNotFoundError,
    DirectoryLockedError,
    InvalidOptionError,
    ItemNotFoundError,
    ReadOnlyError,
    StepAlreadyExistsError,
    StepOrderError,
    TensorMetadata,
    UnsupportedTypeError,
)


def test_three_line_usage_saves_on_interval_and_resumes(tmp_path: Path) -> None:
    opts = CheckpointManagerOptions(save_interval_steps=2, max_to_keep=3)
    state = tiny_training_state()
    with CheckpointManager(tmp_path / "ckpt", opts) as mgr:
        assert mgr.restore(state, missing_ok=True) is None
        saved = [
            step for step in range(7) if mgr.save(step, state, metrics={"loss": 1 / (step + 1)})
        ]
    assert saved == [0, 2, 4, 6]

    fresh = tiny_training_state(seed=1)
    with CheckpointManager(tmp_path / "ckpt", opts) as mgr:
        assert mgr.all_steps() == [2, 4, 6]
        restored = mgr.restore(fresh)
    assert restored is not None and restored["extra"] == {"epoch": 3}
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh["scheduler"].state_dict() == state["scheduler"].state_dict()
    assert restored["model"] is fresh["model"], "stateful objects are loaded in place"


def test_should_save_never_at_or_below_latest(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager(save_interval_steps=5, enable_async_checkpointing=False)
    assert mgr.should_save(0) and not mgr.should_save(3) and mgr.should_save(5)
    mgr.save(10, {"x": torch.ones(1)})
    assert not mgr.should_save(10) and not mgr.should_save(5) and mgr.should_save(15)


def test_existing_step_is_never_overwritten(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager()
    mgr.save(3, {"x": torch.ones(2)})
    with pytest.raises(StepAlreadyExistsError, match="step 3"):
        mgr.save(3, {"x": torch.zeros(2)}, force=True)
    assert torch.equal(mgr.restore()["x"], torch.ones(2))


def test_lower_step_needs_force(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager()
    mgr.save(10, {"x": torch.ones(1)})
    with pytest.raises(StepOrderError, match="force=True"):
        mgr.save(5, {"x": torch.ones(1)})
    assert mgr.save(5, {"x": torch.ones(1)}, force=True)
    mgr.wait_until_finished()
    assert mgr.all_steps() == [5, 10] and mgr.latest_step() == 10


def test_no_checkpoint_is_a_typed_error(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        mgr.restore()
    mgr.save(1, {"x": torch.ones(1)})
    mgr.wait_until_finished()
    with pytest.raises(CheckpointNotFoundError, match="committed steps: \\[1\\]"):
        mgr.restore(step=7)
    assert mgr.restore(step=7, missing_ok=True) is None


def test_partial_restore_by_items(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager(enable_async_checkpointing=False)
    state = tiny_training_state()
    mgr.save(0, state)
    out = mgr.restore(items=["model", "extra"])
    assert set(out) == {"model", "extra"}
    assert set(out["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with pytest.raises(ItemNotFoundError, match="'nope'"):
        mgr.restore(items=["nope"])


def test_restore_fills_existing_tensors_in_place(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager(enable_async_checkpointing=False)
    saved = tiny_training_state(seed=0)
    mgr.save(0, saved)
    target = tiny_training_state(seed=1)
    pointers = [p.data_ptr() for p in target["model"].parameters()]
    mgr.restore(target)
    assert [p.data_ptr() for p in target["model"].parameters()] == pointers
    assert all(
        torch.equal(a, b)
        for a, b in zip(saved["model"].parameters(), target["model"].parameters(), strict=True)
    )


def test_cache_and_reload_see_other_writers(tmp_path: Path) -> None:
    writer = CheckpointManager(tmp_path, CheckpointManagerOptions(enable_async_checkpointing=False))
    reader = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
    writer.save(1, {"x": torch.ones(1)})
    assert reader.latest_step() is None, "served from the cache until reload()"
    reader.reload()
    assert reader.latest_step() == 1
    writer.delete(1)
    reader.reload()
    assert reader.all_steps() == []
    writer.close()
    reader.close()


def test_metrics_metadata_and_item_metadata(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager(enable_async_checkpointing=False)
    mgr.save(
        2,
        {"model": torch.nn.Linear(3, 2), "extra": {"epoch": 1}},
        metrics={"loss": torch.tensor(0.5), "eval": {"acc": 0.9}},
    )
    assert mgr.metrics(2) == {"loss": 0.5, "eval": {"acc": 0.9}}
    meta = mgr.item_metadata(2)
    assert meta["model"]["weight"] == TensorMetadata((2, 3), "float32", 24)
    assert meta["extra"] == {"epoch": 1}


def test_read_only_manager_refuses_writes(make_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_manager(enable_async_checkpointing=False).save(1, {"x": torch.ones(1)})
    ro = make_manager(read_only=True)
    for call in (
        lambda: ro.save(2, {"x": torch.ones(1)}),
        lambda: ro.delete(1),
        lambda: ro.protect(1),
    ):
        with pytest.raises(ReadOnlyError):
            call()
    assert ro.all_steps() == [1]


def test_second_writer_is_refused(make_manager) -> None:  # type: ignore[no-untyped-def]
    make_manager()
    with pytest.raises(DirectoryLockedError, match="read_only=True"):
        make_manager()
    make_manager(read_only=True)


def test_unsupported_leaf_fails_before_writing(make_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager()
    with pytest.raises(UnsupportedTypeError, match="extra/hooks/0"):
        mgr.save(1, {"model": torch.nn.Linear(2, 2), "extra": {"hooks": [object()]}})
    assert mgr.all_steps() == [] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".lock"
    ]


def test_invalid_step_and_state(make_manager) -> None:  # type: ignore[no-untyped-def]
    mgr = make_manager()
    with pytest.raises(InvalidOptionError, match="step"):
        mgr.save(-1, {"x": 1})
    with pytest.raises(InvalidOptionError, match="mapping of item names"):
        mgr.save(1, [torch.ones(1)])


def test_step_naming_on_disk(make_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_manager(enable_async_checkpointing=False).save(100, {"x": torch.ones(1)})
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "step_00000100" / "checkpoint.json").is_file()
    other = make_manager(tmp_path / "orbax", step_prefix=None, step_format_fixed_length=None)
    other.save(7, {"x": torch.ones(1)})
    other.wait_until_finished()
    assert (tmp_path / "orbax" / "7" / "checkpoint.json").is_file()


def test_copy_to_takes_the_save_in_flight(tmp_path: Path) -> None:
    """An async save returns before its step is committed; copy_to waits for it, as
    restore does, instead of copying the steps before it."""
    with (
        CheckpointManager(tmp_path / "src") as src,
        CheckpointManager(tmp_path / "dst") as dst,
    ):
        src.save(1, {"x": torch.randn(20_000_000)})  # 80 MB: still being written
        assert src.copy_to(dst, dry_run=True) == [1]
        assert src.copy_to(dst) == [1]
        assert torch.equal(dst.restore(step=1)["x"], src.restore(step=1)["x"])
