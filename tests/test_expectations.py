"""What users migrating from Orbax, Lightning and Accelerate expect in their first week
(each found by a trial of the peers' own tests or of a new user)."""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    EveryNSteps,
    InvalidOptionError,
    KeepLatest,
)

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


def test_a_read_only_manager_never_wants_to_save(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, SYNC) as writer:
        writer.save(1, {"x": torch.zeros(1)})
    options = CheckpointManagerOptions(read_only=True, save_interval_steps=1)
    with CheckpointManager(tmp_path, options) as reader:
        assert reader.should_save(2) is False  # as Orbax; save() would raise


def test_a_manager_made_and_closed_in_a_worker_thread(tmp_path: Path) -> None:
    failures: list[BaseException] = []

    def evaluator() -> None:
        try:
            with CheckpointManager(tmp_path, SYNC) as mgr:
                mgr.save(1, {"x": torch.zeros(1)})
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=evaluator)
    thread.start()
    thread.join()
    assert failures == []


def test_a_flat_metric_key_with_slashes_ranks(tmp_path: Path) -> None:
    """Lightning and W&B log ``{"val/loss": x}``: the literal key comes first."""
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_metric="val/loss", best_mode="min"
    )
    with CheckpointManager(tmp_path, options) as mgr:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)):
            mgr.save(step, {"x": torch.zeros(1)}, metrics={"val/loss": loss})
        assert mgr.all_steps() == [2, 4] and mgr.best_step() == 2
    nested = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_metric="val/loss", best_mode="min"
    )
    with CheckpointManager(tmp_path / "nested", nested) as mgr:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7)):
            mgr.save(step, {"x": torch.zeros(1)}, metrics={"val": {"loss": loss}})
        assert mgr.all_steps() == [2, 3]


def test_a_best_rule_that_ranks_nothing_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_metric="val_loss"
    )
    with (
        caplog.at_level(logging.WARNING, "checkpointing"),
        CheckpointManager(tmp_path, options) as mgr,
    ):
        for step in range(1, 5):
            mgr.save(step, {"x": torch.zeros(1)}, metrics={"val/loss": 1.0 / step})
    said = [r.getMessage() for r in caplog.records if "none of the" in r.getMessage()]
    assert len(said) == 1, said
    assert "best 1 by 'val_loss'" in said[0] and "val/loss" in said[0], said[0]
    assert "none of the 2 steps" in said[0], "said once it has to choose, not at the first"


@pytest.mark.parametrize(
    ("field", "policy", "hint"),
    [
        ("retention_policy", EveryNSteps(1000), "pass it as save_policy="),
        ("save_policy", KeepLatest(3), "pass it as retention_policy="),
        ("retention_policy", "latest", ""),
    ],
)
def test_a_policy_of_the_wrong_kind_is_refused_at_once(
    field: str, policy: object, hint: str
) -> None:
    with pytest.raises(InvalidOptionError, match=field) as refused:
        CheckpointManagerOptions(**{field: policy})  # type: ignore[arg-type]
    assert hint in str(refused.value)


def test_intervals_take_seconds_or_timedeltas_alike() -> None:
    options = CheckpointManagerOptions(
        save_interval_secs=datetime.timedelta(minutes=30),
        keep_time_interval=datetime.timedelta(hours=2),
    )
    assert options.save_interval_secs == 1800.0 and options.keep_time_interval == 7200.0


def test_non_finite_metrics_and_metadata_come_back_as_floats(tmp_path: Path) -> None:
    metrics = {"loss": float("nan"), "grad": {"max": float("inf"), "min": -math.inf}}
    metadata = {"lr": float("nan"), "note": "nan", "tags": ["a", float("-inf")]}
    with CheckpointManager(tmp_path, SYNC) as mgr:
        mgr.save(1, {"x": torch.zeros(1)}, metrics=metrics, metadata=metadata)
        mgr.record_metrics(1, {"eval": float("nan")})
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as reader:
        got = reader.metrics(1)
        assert got is not None and math.isnan(got["loss"]) and math.isnan(got["eval"])
        assert got["grad"] == {"max": math.inf, "min": -math.inf}
        back = reader.metadata(1)
        assert back is not None and math.isnan(back["lr"]) and back["note"] == "nan"
        assert back["tags"] == ["a", -math.inf]
        assert reader.metadata()["tags"] == back["tags"]  # type: ignore[index]  # the latest


def test_restore_of_a_step_number_says_how(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, SYNC) as mgr:
        mgr.save(8, {"x": torch.zeros(1)})
        with pytest.raises(InvalidOptionError, match=r"restore\(step=8\)"):
            mgr.restore(8)  # type: ignore[arg-type]


def test_compiled_and_plain_modules_restore_into_each_other(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    compiled = torch.compile(plain)  # compiles at its first call, never made here
    with CheckpointManager(tmp_path, SYNC) as mgr:
        mgr.save(1, {"model": compiled})
        mgr.save(2, {"model": plain})
        assert "_orig_mod" not in str(mgr.item_metadata(1))
        for step in (1, 2):
            fresh = torch.nn.Sequential(
                torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
            )
            mgr.restore({"model": fresh}, step=step)
            assert all(
                torch.equal(a, b)
                for a, b in zip(fresh.parameters(), plain.parameters(), strict=True)
            )
            into_compiled = torch.compile(
                torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            )
            restored = mgr.restore({"model": into_compiled}, step=step)
            assert restored is not None and restored["model"] is into_compiled
            got = into_compiled.state_dict()
            assert all(torch.equal(got[f"_orig_mod.{k}"], v) for k, v in plain.state_dict().items())


def test_a_data_file_loads_as_a_plain_state_dict(tmp_path: Path) -> None:
    """Files of 1 MiB or more hold alignment padding entries; `load_file` leaves them out
    (and keeps a tensor of the user's that happens to be named like one)."""
    from safetensors.torch import load_file as safetensors_load_file

    from checkpointing import load_file

    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.Linear(512, 3))
    with CheckpointManager(tmp_path, SYNC) as mgr:
        odd = {"big": torch.ones(1 << 19), "__pad1__": torch.arange(3), "x": torch.ones(99)}
        mgr.save(1, {"model": model, "odd": odd})
    path = tmp_path / "step_00000001" / "model.safetensors"
    assert set(safetensors_load_file(path)) > set(model.state_dict()), "padding is there"
    fresh = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.Linear(512, 3))
    fresh.load_state_dict(load_file(path))  # strict: no unexpected keys
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
    )
    loaded = load_file(tmp_path / "step_00000001" / "odd.safetensors")
    assert loaded.keys() == odd.keys() and all(torch.equal(loaded[k], odd[k]) for k in odd)


def test_continuous_checkpointing_never_waits_for_a_save_in_flight(tmp_path: Path) -> None:
    from checkpointing import Continuous

    options = CheckpointManagerOptions(save_policy=Continuous())
    with CheckpointManager(tmp_path, options) as mgr:
        assert mgr.save(1, {"x": torch.randn(1 << 22)})  # 16 MiB, written in the background
        for step in range(2, 200):
            answer = mgr.should_save(step)
            if mgr.is_saving_in_progress():  # busy throughout: the save of step 1
                assert answer is False
            elif answer:
                break
        mgr.wait_until_finished()
        assert mgr.should_save(step + 1)


@pytest.mark.parametrize(
    ("writer_naming", "folder"),
    [
        ({"step_prefix": None, "step_format_fixed_length": None}, "7"),  # Orbax's
        ({"step_naming": "checkpoint_n"}, "checkpoint_7"),  # Accelerate's
        ({"step_prefix": "step", "step_format_fixed_length": None}, "step_7"),
    ],
)
def test_readers_find_steps_of_writers_named_otherwise(
    tmp_path: Path, writer_naming: dict[str, object], folder: str
) -> None:
    """`checkpoints_iterator` on such a directory silently yielded nothing."""
    from checkpointing import checkpoint_n_naming, checkpoints_iterator, wait_for_new_checkpoint

    if writer_naming.get("step_naming") == "checkpoint_n":
        writer_naming = {"step_naming": checkpoint_n_naming()}
    options = CheckpointManagerOptions(enable_async_checkpointing=False, **writer_naming)  # type: ignore[arg-type]
    with CheckpointManager(tmp_path, options) as writer:
        writer.save(7, {"x": torch.full((2,), 7.0)})
    assert (tmp_path / folder / "checkpoint.json").is_file()
    assert list(checkpoints_iterator(str(tmp_path), timeout=0.1, poll_interval_secs=0.05)) == [7]
    assert wait_for_new_checkpoint(str(tmp_path), timeout=0.1) == 7
    assert wait_for_new_checkpoint(str(tmp_path), until_step=7, timeout=0.1) is None
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as reader:
        restored = reader.restore()
        assert restored is not None and float(restored["x"][0]) == 7.0


@pytest.mark.parametrize(
    ("writer_naming", "folder"),
    [
        ({"step_prefix": None, "step_format_fixed_length": None}, "7"),  # Orbax's
        ({"step_naming": "checkpoint_n"}, "checkpoint_7"),  # Accelerate's
    ],
)
def test_a_writer_named_otherwise_refuses_instead_of_starting_afresh(
    tmp_path: Path, writer_naming: dict[str, object], folder: str
) -> None:
    """A default writer on such a directory listed no steps: restore(missing_ok=True)
    returned None and training started from scratch beside the old steps (a new user's
    trial)."""
    from checkpointing import checkpoint_n_naming

    if writer_naming.get("step_naming") == "checkpoint_n":
        writer_naming = {"step_naming": checkpoint_n_naming()}
    options = CheckpointManagerOptions(enable_async_checkpointing=False, **writer_naming)  # type: ignore[arg-type]
    with CheckpointManager(tmp_path, options) as writer:
        writer.save(7, {"x": torch.full((2,), 7.0)})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidOptionError, match=rf"named otherwise.*{folder}.*step_prefix=None"):
        CheckpointManager(tmp_path, SYNC)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with CheckpointManager(tmp_path, options) as writer:  # the options that wrote them
        assert writer.all_steps() == [7]
        writer.save(8, {"x": torch.full((2,), 8.0)})
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as reader:
        assert reader.all_steps() == [7, 8]


def test_wait_for_new_checkpoint_returns_when_one_is_committed(tmp_path: Path) -> None:
    from checkpointing import wait_for_new_checkpoint

    def writer() -> None:
        time.sleep(0.3)
        with CheckpointManager(tmp_path, SYNC) as mgr:
            mgr.save(3, {"x": torch.zeros(1)})

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_for_new_checkpoint(str(tmp_path), timeout=60, poll_interval_secs=0.05) == 3
    finally:
        thread.join()


def test_an_on_commit_hook_sees_each_committed_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[int, bool]] = []

    def hook(step: int, directory: str) -> None:
        seen.append((step, (Path(directory) / "checkpoint.json").is_file()))
        if step == 2:
            raise RuntimeError("the tracker is down")

    options = CheckpointManagerOptions(max_to_keep=5)  # async saves: the hook runs behind
    with (
        caplog.at_level(logging.ERROR, "checkpointing"),
        CheckpointManager(tmp_path, options, on_commit=hook) as mgr,
    ):
        for step in (1, 2, 3):
            mgr.save(step, {"x": torch.zeros(4)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2, 3], "a failing hook fails no save"
    assert seen == [(1, True), (2, True), (3, True)]
    assert "the on_commit hook failed for step 2" in caplog.text
