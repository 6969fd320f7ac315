"""The remote tier of a mirrored manager, with a local folder as the remote: what it
uploads (and never uploads), what its retention keeps, what it agrees on across
processes, and that a failing remote costs the local tier nothing. (Object stores:
tests/remote.)"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    MirrorStatus,
    RemoteBehindError,
)
from checkpointing.catalog import StepCatalog
from checkpointing.coordination import SingleProcess
from checkpointing.errors import CheckpointNotFoundError
from checkpointing.format.naming import PrefixNaming
from checkpointing.remote_tier import Mirror, NoRemote
from checkpointing.storage import LocalStorage

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


def steps_in(path: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in path.glob("step_*") if (p / "checkpoint.json").is_file())


def mirrored(local: Path, remote: Path, **kwargs: object) -> CheckpointManager:
    options = kwargs.pop("options", SYNC)
    return CheckpointManager(local, options, remote=f"file://{remote}", **kwargs)  # type: ignore[arg-type]


def save(mgr: CheckpointManager, *steps: int) -> None:
    for step in steps:
        mgr.save(step, {"x": torch.full((2,), float(step))}, metrics={"score": 1.0})


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The steps the mirror uploads, in order."""
    from checkpointing import remote_tier

    done: list[int] = []
    real = remote_tier.copy_step

    def spy(src, dst, names, record, *args):  # type: ignore[no-untyped-def]
        if dst.url.endswith("remote"):
            done.append(record.step)
        return real(src, dst, names, record, *args)

    monkeypatch.setattr(remote_tier, "copy_step", spy)
    yield done


def test_no_remote_lists_nothing_and_has_no_steps() -> None:
    none = NoRemote()
    assert none.reload() == {} and none.listed() == {} and none.status() is None
    with pytest.raises(CheckpointNotFoundError):
        none.location(1)


def test_uploads_what_the_remote_lacks_and_applies_its_own_retention(
    tmp_path: Path, uploads: list[int]
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    with mirrored(local, remote, remote_retention=KeepLatest(2)) as mgr:
        save(mgr, 1, 2, 3)
        mgr.wait_until_finished()
        assert steps_in(remote) == [2, 3] and steps_in(local) == [1, 2, 3]
        status = mgr.mirror_status()
        assert isinstance(status, MirrorStatus)
        assert status.behind == () and status.last_error is None
        assert status.remote_steps == (2, 3)
    assert len(uploads) == len(set(uploads)) and set(uploads) <= {1, 2, 3}
    with CheckpointManager(remote, CheckpointManagerOptions(read_only=True)) as reader:
        assert reader.all_steps() == [2, 3], "a new process lists what was uploaded"


def test_never_uploads_a_step_its_retention_would_delete_at_once(
    tmp_path: Path, uploads: list[int]
) -> None:
    """A stricter remote retention: odd steps are never uploaded, and no step twice
    (before, pruned steps were uploaded again at every save)."""
    blocker = tmp_path / "blocker"  # holds the first pass back until all are saved
    blocker.write_text("")
    local, remote = tmp_path / "local", blocker / "remote"
    with mirrored(local, remote, remote_retention=KeepEveryNSteps(2)) as mgr:
        save(mgr, *range(1, 8))
        blocker.unlink()
        mgr.wait_until_finished()
        assert sorted(uploads) == [2, 4, 6, 7], "7: the newest is always kept"
        for step in (8, 9, 10):
            save(mgr, step)
            mgr.wait_until_finished()
        assert steps_in(remote) == [2, 4, 6, 8, 10]
    assert sorted(uploads) == [2, 4, 6, 7, 8, 9, 10], "each once; 7 and 9 while newest"


BEST = KeepBest(1, "score", "max", keep_without_metrics=False)


def test_remote_retention_honours_protections_leases_and_recorded_metrics(
    tmp_path: Path,
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"

    def saved(step: int) -> list[int]:
        save(mgr, step)
        mgr.wait_until_finished()
        return steps_in(remote)

    with mirrored(local, remote, remote_retention=BEST) as mgr:
        save(mgr, 1, 2)
        mgr.protect(1)
        mgr.wait_until_finished()
        assert json.loads((remote / "protected.json").read_text()) == [1]
        # An evaluation job on the remote scores step 2, then leases step 4.
        with CheckpointManager(remote, CheckpointManagerOptions(read_only=True)) as evaluator:
            evaluator.record_metrics(2, {"score": 9.0})
            assert saved(3) == [1, 2, 3], "1 protected, 2 best, 3 newest"
            assert saved(4) == [1, 2, 4]
            with evaluator.reading(4):
                assert saved(5) == [1, 2, 4, 5], "4 leased"
        assert saved(6) == [1, 2, 6]
        mgr.unprotect(1)
        assert saved(7) == [2, 7]
        assert json.loads((remote / "protected.json").read_text()) == []


def test_metrics_recorded_locally_reach_the_remote(tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    with mirrored(local, remote, remote_retention=BEST) as mgr:
        save(mgr, 1)
        mgr.record_metrics(1, {"score": 5.0})
        save(mgr, 2, 3)
        mgr.wait_until_finished()
        assert steps_in(remote) == [1, 3], "1 ranks best by the metric recorded locally"
        recorded = json.loads((remote / "step_00000001" / "recorded_metrics.json").read_text())
        assert recorded == {"score": 5.0}


def test_a_failing_remote_costs_the_local_tier_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the remote's parent folder should be")
    local, remote = tmp_path / "local", blocker / "remote"
    with mirrored(local, remote) as mgr:
        save(mgr, 1, 2, 3)  # never raises: the remote is the sync thread's business
        mgr.check_for_errors()
        assert steps_in(local) == [1, 2, 3]
        with pytest.raises(RemoteBehindError, match=r"lacks steps \[1, 2, 3\]"):
            mgr.wait_until_finished()
        status = mgr.mirror_status()
        assert status is not None and status.behind == (1, 2, 3)
        assert status.last_error and "NotADirectoryError" in status.last_error
        assert status.failing_since is not None
        blocker.unlink()
        mgr.wait_until_finished()  # the remote is back: the next pass catches up
        assert steps_in(remote) == [1, 2, 3]
        assert mgr.mirror_status().last_error is None  # type: ignore[union-attr]


def test_uploads_left_by_a_dead_job_resume_at_the_next_open(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    local, remote = tmp_path / "local", blocker / "remote"
    with mirrored(local, remote) as mgr:
        save(mgr, 1, 2)
    blocker.unlink()
    with mirrored(local, remote) as mgr:  # opening starts a pass
        mgr.wait_until_finished()
        assert steps_in(remote) == [1, 2]


def test_delete_reaches_both_tiers(tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    with mirrored(local, remote) as mgr:
        save(mgr, 1, 2)
        mgr.wait_until_finished()
        mgr.delete(1)
        assert mgr.all_steps() == [2]
        mgr.wait_until_finished()
        assert steps_in(remote) == [2] and steps_in(local) == [2]


def test_a_fresh_node_resumes_from_the_remote(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    with mirrored(tmp_path / "node1", remote) as mgr:
        save(mgr, 1, 2)
    with mirrored(tmp_path / "node2", remote) as mgr:
        assert mgr.latest_step() == 2
        restored = mgr.restore()
        assert restored is not None and torch.equal(restored["x"], torch.full((2,), 2.0))
        assert steps_in(tmp_path / "node2") == [2], "downloaded into the local tier"


class Primary(SingleProcess):
    """The primary of a job of two: its broadcasts are what everyone gets."""

    world_size = 2


def test_in_a_job_the_listing_changes_at_the_join(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "local", SYNC) as mgr:
        save(mgr, 1)
    storage = LocalStorage(tmp_path / "local", create=False)
    catalog = StepCatalog(storage, PrefixNaming(), primary=True, read_only=False)
    catalog.load(catalog.scan())
    mirror = Mirror(
        f"file://{tmp_path / 'remote'}",
        local=storage,
        local_catalog=catalog,
        storage_options=None,
        retention=None,
        naming=PrefixNaming(),
        coordinator=Primary(),
        always_keep_latest=True,
        lease_secs=30,
        clock=lambda: 0.0,
    )
    mirror.after_commit(Primary(), held=False)
    mirror.wait()
    assert list(mirror.known()) == [1] and list(mirror.listed()) == []  # agreed before upload
    mirror.after_commit(Primary(), held=True)
    assert list(mirror.listed()) == [], "held until the save is joined"
    mirror.release_held()
    assert list(mirror.listed()) == [1]
    mirror.delete(1)
    assert mirror.listed() == {}
    mirror.wait()
    assert not (tmp_path / "remote" / "step_00000001").exists()
    mirror.close()


def test_the_best_step_may_be_one_only_the_remote_keeps(tmp_path: Path) -> None:
    """Local retention keeps the newest step; the remote keeps every step. The best
    step by its metric is an older one, found on the remote and restored from it."""
    options = dataclasses.replace(
        SYNC, retention_policy=KeepLatest(1), best_metric="loss", best_mode="min"
    )
    with mirrored(tmp_path / "local", tmp_path / "remote", options=options,
                  remote_retention=None) as mgr:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.4)):
            mgr.save(step, {"x": torch.full((2,), float(step))}, metrics={"loss": loss})
        mgr.wait_until_finished()
        mgr.prune()  # a step still uploading when step 3 was saved is kept until now
        assert steps_in(tmp_path / "local") == [3]
        assert mgr.best_step() == 2
        restored = mgr.restore(step=2)
        assert restored is not None and torch.equal(restored["x"], torch.full((2,), 2.0))
