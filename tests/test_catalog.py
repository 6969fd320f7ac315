"""The step catalog: what a scan finds, held changes, folders, protections and the
metrics evaluation jobs record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.catalog import StepCatalog
from checkpointing.errors import CheckpointNotFoundError, CorruptCheckpointError
from checkpointing.format.naming import PrefixNaming
from checkpointing.storage import LocalStorage

STATE = {"x": torch.ones(3)}
SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


def _saved(path: Path, *steps: int) -> None:
    with CheckpointManager(path, SYNC) as mgr:
        for step in steps:
            mgr.save(step, STATE, metrics={"loss": float(step)})


def _catalog(path: Path, *, read_only: bool = False, padding: int = 8) -> StepCatalog:
    storage = LocalStorage(path, create=False)
    catalog = StepCatalog(storage, PrefixNaming("step", padding), primary=True, read_only=read_only)
    catalog.load(catalog.scan())
    return catalog


def test_a_scan_finds_records_folders_and_unreadable_steps(tmp_path: Path) -> None:
    _saved(tmp_path, 1, 2, 3)
    (tmp_path / "step_00000003" / "checkpoint.json").write_text("{")
    (tmp_path / "step_00000007").mkdir()  # no record: not a step
    (tmp_path / "notes").mkdir()
    catalog = _catalog(tmp_path)
    assert list(catalog.records) == [1, 2] and list(catalog.listed()) == [1, 2]
    assert list(catalog.unreadable) == [3]
    assert catalog.folder(2) == "step_00000002" and catalog.folder(9) == "step_00000009"
    assert catalog.metrics(1, catalog.records[1].metrics) == {"loss": 1.0}


def test_folders_are_remembered_whatever_the_padding_is_now(tmp_path: Path) -> None:
    _saved(tmp_path, 5)
    (tmp_path / "step_00000005").rename(tmp_path / "step_005")
    catalog = _catalog(tmp_path)
    assert catalog.folder(5) == "step_005" and list(catalog.records) == [5]


def test_of_two_folders_of_one_step_todays_name_wins(tmp_path: Path) -> None:
    _saved(tmp_path, 5)
    (tmp_path / "step_5").mkdir()
    record = (tmp_path / "step_00000005" / "checkpoint.json").read_bytes()
    (tmp_path / "step_5" / "checkpoint.json").write_bytes(record)
    assert _catalog(tmp_path).folder(5) == "step_00000005"
    assert _catalog(tmp_path, padding=1).folder(5) == "step_5"


def test_held_changes_are_listed_from_the_join(tmp_path: Path) -> None:
    _saved(tmp_path, 1, 2)
    catalog = _catalog(tmp_path)
    record = catalog.records[2]
    catalog.add(3, record, held=True)
    with catalog.lock:
        catalog.forget([1], held=True)
    assert list(catalog.records) == [2, 3], "decisions see every commit and delete"
    assert list(catalog.listed()) == [1, 2], "listings do not, until the join"
    catalog.release_held()
    assert list(catalog.listed()) == [2, 3]


def test_protections_persist_and_a_damaged_file_stops_only_writers(tmp_path: Path) -> None:
    _saved(tmp_path, 1, 2)
    catalog = _catalog(tmp_path)
    catalog.set_protected(1, True)
    assert json.loads((tmp_path / "protected.json").read_text()) == [1]
    assert _catalog(tmp_path).protected == {1}
    (tmp_path / "protected.json").write_text('["one"]')
    with pytest.raises(CorruptCheckpointError, match=r"write the list again"):
        _catalog(tmp_path)
    assert _catalog(tmp_path, read_only=True).protected == set()


def test_evaluator_metrics_never_bring_back_a_deleted_step(tmp_path: Path) -> None:
    _saved(tmp_path, 1)
    catalog = _catalog(tmp_path, read_only=True)
    catalog.record_metrics(1, {"acc": 0.5})
    assert catalog.metrics(1, {"loss": 1.0}) == {"loss": 1.0, "acc": 0.5}
    (tmp_path / "step_00000001" / "checkpoint.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="deleted"):
        catalog.record_metrics(1, {"acc": 0.6})


def test_recorded_metrics_drive_best_n_in_the_writer(tmp_path: Path) -> None:
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_metric="eval/acc"
    )
    with CheckpointManager(tmp_path, options) as trainer:
        for step in (1, 2, 3):
            trainer.save(step, STATE)  # no metrics at save time: all kept (unranked)
        evaluator = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        for step, acc in ((1, 0.9), (2, 0.5), (3, 0.7)):
            evaluator.record_metrics(step, {"eval": {"acc": acc}})
        record = json.loads((tmp_path / "step_00000001" / "checkpoint.json").read_text())
        assert record["metrics"] is None, "the commit record is untouched"
        trainer.reload()
        assert trainer.best_step() == 1 and trainer.metrics(1) == {"eval": {"acc": 0.9}}
        trainer.save(4, STATE, metrics={"eval": {"acc": 0.1}})
        assert trainer.all_steps() == [1, 4], "the best by recorded metrics, and the newest"
        evaluator.close()
