"""Reader leases: a leased step outlives retention, expired and racing leases."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions, leases
from checkpointing.storage import LocalStorage

STATE = {"x": torch.ones(3)}


def _writer(path: Path, **options: object) -> CheckpointManager:
    opts = CheckpointManagerOptions(enable_async_checkpointing=False, **options)  # type: ignore[arg-type]
    return CheckpointManager(path, opts)


def test_lease_defers_deletion_until_released(tmp_path: Path) -> None:
    with _writer(tmp_path, max_to_keep=1) as trainer:
        trainer.save(1, STATE)
        reader = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        with reader.reading(1) as present:
            assert present
            trainer.save(2, STATE)
            trainer.save(3, STATE)
            assert trainer.all_steps() == [1, 3], "the leased step survives retention"
            report = {r.step: r for r in trainer.retention_report()}
            assert report[1].kept and report[1].reasons == ("in progress",), report[1]
            assert reader.restore(step=1) is not None
        trainer.save(4, STATE)
        assert trainer.all_steps() == [4], "retention catches up once the lease ended"
        reader.close()


def test_expired_lease_is_ignored(tmp_path: Path) -> None:
    with _writer(tmp_path, max_to_keep=1) as trainer:
        trainer.save(1, STATE)
        lease = tmp_path / leases.LEASE_DIR / f"1.{'c' * 32}.json"  # a crashed reader's
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(json.dumps({"step": 1, "expires_at": time.time() - 1}))
        trainer.save(2, STATE)
        assert trainer.all_steps() == [2] and not lease.exists()


def test_lease_and_deletion_race_has_one_winner(tmp_path: Path) -> None:
    """A reader leasing a step just after the trainer read the leases: whichever of the
    two looks second sees the other's file."""
    with _writer(tmp_path) as trainer:
        trainer.save(1, STATE)
        storage = LocalStorage(tmp_path, create=False)
        reader = CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True))
        with leases.deleting(storage, 1) as free:
            assert free
            with reader.reading(1) as present:
                assert not present, "the reader looked second: it skips the step"
        with reader.reading(1) as present, leases.deleting(storage, 1) as free:
            assert present and not free, "the trainer looked second: it keeps the step"
        assert not list((tmp_path / leases.LEASE_DIR).iterdir()), "marks and leases are gone"
        reader.close()
