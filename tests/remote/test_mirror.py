"""A local directory mirrored to S3 or GCS: the remote never costs the local tier, and
what a dead job left unuploaded reaches the bucket when the job restarts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Store, fresh_fs

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    RemoteBehindError,
)
from checkpointing.storage import remote as remote_storage

OPTS = CheckpointManagerOptions(max_to_keep=3, writer_lease_secs=1.5)


def steps_in(path: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in path.glob("step_*") if (p / "checkpoint.json").is_file())


def dead_endpoint(store: Store) -> dict[str, Any]:
    """The store's options pointed at a port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    if store.kind == "s3":
        return {
            **store.options,
            "client_kwargs": {**store.options["client_kwargs"], "endpoint_url": url},
        }
    return {**store.options, "endpoint_url": url}


@pytest.mark.parametrize("outage", ["refused", "stalled"])
def test_a_remote_dead_for_a_whole_run_costs_nothing_local(
    store: Store, outage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial's finding: every second save of a mirrored manager raised the upload
    error and lost that step locally, and saves blocked for 17-23 s."""
    monkeypatch.setattr(remote_storage, "FIRST_CONTACT_SECS", 2.0)  # each pass's wait
    local, url = tmp_path / "local", store.bucket + "/run"
    if outage == "stalled":  # the endpoint accepts connections and never answers
        options = store.proxied
        store.proxy.inject("stall", 10**6, seconds=600)
    else:
        options = dead_endpoint(store)
    with CheckpointManager(local, OPTS, remote=url, storage_options=options) as mgr:
        for step in range(1, 7):
            assert mgr.save(step, {"w": torch.full((1 << 16,), float(step))})
            mgr.check_for_errors()  # upload failures never reach the loop
        with pytest.raises(RemoteBehindError, match=r"lacks steps \[4, 5, 6\]") as behind:
            mgr.wait_until_finished()
        assert steps_in(local) == [4, 5, 6], "every local save kept, local retention applied"
        assert "RemoteUnavailableError" in str(behind.value)
        status = mgr.mirror_status()
        assert status is not None and status.behind == (4, 5, 6)
        assert status.remote_steps == () and status.failing_since is not None
        if outage == "stalled":
            store.proxy.clear()  # the store is back
            mgr.wait_until_finished()
            assert mgr.mirror_status().behind == ()  # type: ignore[union-attr]
    if outage == "stalled":
        with CheckpointManager(url, OPTS, storage_options=store.options) as remote:
            assert remote.all_steps() == [4, 5, 6]


MIRRORED = """
import sys, time, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import gcs_options, s3_options
local, url, kind, endpoint = sys.argv[1:]
options = (s3_options if kind == "s3" else gcs_options)(endpoint)
opts = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lease_secs=1.5)
mgr = CheckpointManager(local, opts, remote=url, storage_options=options)
for step in (1, 2, 3):
    mgr.save(step, {"w": torch.full((1 << 18,), float(step))})
    if step == 2:
        mgr.wait_until_finished()
print("saved", flush=True)
time.sleep(600)
"""


def test_killed_mid_upload_then_a_fresh_node_resumes_from_the_newest_step(
    store: Store, tmp_path: Path
) -> None:
    """The trial's finding: a step saved locally but not uploaded when the job died
    stayed local until the next save, so a fresh node resumed from an older step."""
    local, url = tmp_path / "node1", store.bucket + "/run"
    store.proxy.inject("stall", 1, match="step_00000003", seconds=600)
    proxy_endpoint = store.proxy.url
    child = subprocess.Popen(
        [sys.executable, "-c", MIRRORED, str(local), url, store.kind, proxy_endpoint],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "saved\n"
    deadline = time.monotonic() + 60
    while not store.proxy.injected:  # the upload of step 3 is in flight
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    child.kill()
    child.wait()
    assert steps_in(local) == [1, 2, 3]
    options = CheckpointManagerOptions(writer_lease_secs=1.5)
    with CheckpointManager(url, options, storage_options=store.options) as bucket:
        assert bucket.all_steps() == [1, 2], "the killed upload is invisible"
    # The job restarts on its node: opening the manager resumes the upload.
    with CheckpointManager(local, options, remote=url, storage_options=store.options) as mgr:
        mgr.wait_until_finished()
        assert mgr.mirror_status().behind == ()  # type: ignore[union-attr]
    # A fresh node resumes from the newest step.
    with CheckpointManager(
        tmp_path / "node2", options, remote=url, storage_options=store.options
    ) as fresh:
        assert fresh.latest_step() == 3
        restored = fresh.restore()
        assert restored is not None and float(restored["w"][0]) == 3.0


def test_an_unreadable_remote_record_is_skipped_like_a_local_one(
    store: Store, tmp_path: Path
) -> None:
    """The trial's finding: one damaged record on the remote stopped a mirrored manager
    from opening."""
    url = store.bucket + "/run"
    fs = fresh_fs(store.protocol, store.options)
    fs.pipe_file(f"{url}/step_00000005/checkpoint.json", b'{"checksum":"0", "junk')
    with CheckpointManager(
        tmp_path / "local", OPTS, remote=url, storage_options=store.options
    ) as mgr:
        for step in (6, 7, 8, 9):
            mgr.save(step, {"w": torch.full((4,), float(step))})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [7, 8, 9]
    options = CheckpointManagerOptions(read_only=True)
    with CheckpointManager(url, options, storage_options=store.options) as remote:
        assert remote.all_steps() == [7, 8, 9], "the remote's retention applied"
        assert list(remote.unreadable_steps()) == [5], "and never deleted what it cannot read"


def test_incremental_steps_reach_the_bucket_with_the_files_they_read(
    store: Store, tmp_path: Path
) -> None:
    url = store.bucket + "/run"
    opts = CheckpointManagerOptions(
        incremental=True, max_to_keep=2, enable_async_checkpointing=False
    )
    frozen = torch.randn(50_000)
    with CheckpointManager(
        tmp_path / "node1", opts, remote=url, storage_options=store.options
    ) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"frozen": frozen, "n": torch.full((4,), float(step))})
        mgr.wait_until_finished()
        assert mgr.mirror_status().remote_steps == (1, 3, 4)  # type: ignore[union-attr]
    with CheckpointManager(
        tmp_path / "node2", opts, remote=url, storage_options=store.options
    ) as fresh:  # downloads step 4 and step 1, whose files it reads
        restored = fresh.restore()
        assert torch.equal(restored["frozen"], frozen) and restored["n"][0] == 4.0
        assert steps_in(tmp_path / "node2") == [1, 4]
    # an evaluation job on the bucket: both steps' files through its cache
    read_only = CheckpointManagerOptions(read_only=True)
    with CheckpointManager(
        url, read_only, storage_options=store.options, cache_dir=tmp_path / "cache"
    ) as bucket:
        bucket.verify(4)
        restored = bucket.restore(step=4)
        assert torch.equal(restored["frozen"], frozen) and restored["n"][0] == 4.0
        entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
        assert len(entries) == 2  # step 4's entry and step 1's
    # copy_to another bucket directory: step 4 goes with step 1, which it reads
    with (
        CheckpointManager(tmp_path / "node1", opts) as src,
        CheckpointManager(store.bucket + "/copy", storage_options=store.options) as dst,
    ):
        local = src.all_steps()  # 1, 3, 4, and 2 if retention met it while uploading
        assert {1, 3, 4} <= set(local) and src.copy_to(dst) == local
        dst.verify(4)
        assert dst.restore(step=4)["n"][0] == 4.0


def test_incremental_saves_straight_to_a_bucket(store: Store) -> None:
    """An object-store directory takes incremental saves as a local one does: later
    steps refer to the first for the frozen tensor, retention keeps it, every kept step
    restores and verifies (through the cache), crafted deletes are refused."""
    from checkpointing import CheckpointError

    url = store.bucket + "/incremental"
    opts = CheckpointManagerOptions(
        incremental=True, max_to_keep=2, enable_async_checkpointing=False
    )
    frozen = torch.randn(50_000)
    with CheckpointManager(url, opts, storage_options=store.options) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"frozen": frozen, "n": torch.full((4,), float(step))})
        assert mgr.all_steps() == [1, 3, 4]
        report = {r.step: r.reasons for r in mgr.retention_report()}
        assert "holds tensors of step 4" in report[1]
        assert mgr.last_save_stats().nbytes < frozen.nbytes  # type: ignore[union-attr]
        with pytest.raises(CheckpointError, match="read"):
            mgr.delete(1)
        for step in (1, 3, 4):
            mgr.verify(step)
            restored = mgr.restore(step=step)
            assert torch.equal(restored["frozen"], frozen) and restored["n"][0] == step
