"""CheckpointManager on real S3 (moto) and GCS (fake-gcs-server) servers over loopback."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Proxied, fresh_fs

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    KeepEveryNSteps,
    RemoteStorageError,
)

# Short writer leases: a killed writer's lease expires within the test.
SYNC = CheckpointManagerOptions(
    enable_async_checkpointing=False, max_to_keep=2, writer_lease_secs=2
)


def state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": torch.nn.Linear(64, 32), "extra": {"step": step}}


def assert_restores(mgr: CheckpointManager, step: int) -> None:
    restored = mgr.restore(step=step)
    assert restored is not None and restored["extra"] == {"step": step}
    expected = state(step)["model"].state_dict()
    assert all(torch.equal(restored["model"][k], v) for k, v in expected.items())


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_direct_save_list_retain_restore(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{store}_bucket") + "/run1"
    options = request.getfixturevalue(f"{store}_storage_options")
    with CheckpointManager(url, SYNC, storage_options=options, cache_dir=tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step), metrics={"loss": 1 / step})
        assert mgr.all_steps() == [2, 3]
        assert_restores(mgr, 3)
    fs = fresh_fs("s3" if store == "s3" else "gs", options)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
    assert names == [".lock", "step_00000002", "step_00000003"], "the lease, the steps"
    reader = CheckpointManager(
        url,
        CheckpointManagerOptions(read_only=True),
        storage_options=options,
        cache_dir=tmp_path / "other",
    )
    assert reader.all_steps() == [2, 3] and reader.metrics(2) == {"loss": 0.5}
    assert_restores(reader, 2)
    reader.verify(2)
    reader.close()


def test_latest_step_is_served_from_the_cache(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = fresh_fs("s3", s3_proxy.storage_options)
    fs.call_s3("create_bucket", Bucket=s3_bucket.removeprefix("s3://") + "-proxied")
    url = s3_bucket + "-proxied/run"
    with CheckpointManager(url, SYNC, storage_options=s3_proxy.storage_options) as mgr:
        mgr.save(1, state(1))
        before = len(s3_proxy.proxy.requests)
        for step in range(2, 200):
            mgr.latest_step(), mgr.should_save(step), mgr.all_steps()
        assert len(s3_proxy.proxy.requests) == before, "the loop must not list the bucket"


def test_transient_failures_are_retried(s3_bucket: str, s3_proxy: Proxied, tmp_path: Path) -> None:
    fs = fresh_fs("s3", s3_proxy.storage_options)
    bucket = s3_bucket.removeprefix("s3://") + "-flaky"
    fs.call_s3("create_bucket", Bucket=bucket)
    url = f"s3://{bucket}/run"
    with CheckpointManager(
        url, SYNC, storage_options=s3_proxy.storage_options, cache_dir=tmp_path
    ) as mgr:
        s3_proxy.proxy.inject("reset", 2, match="PUT ")
        s3_proxy.proxy.inject("http_error", 3, match="PUT ", status=503)
        assert mgr.save(1, state(1))
        s3_proxy.proxy.inject("http_error", 2, match="GET ", status=500)
        assert_restores(mgr, 1)
    assert s3_proxy.proxy.pending == 0, "every injected fault was hit and survived"


def test_permanent_failure_is_immediate_and_clear(s3_storage_options: dict[str, Any]) -> None:
    url = "s3://no-such-bucket-here/run"
    started = time.monotonic()
    with pytest.raises(RemoteStorageError, match="there is no bucket 'no-such-bucket-here'"):
        CheckpointManager(url, SYNC, storage_options=s3_storage_options)
    assert time.monotonic() - started < 10, "a missing bucket is not retried"


def test_mirror_keeps_tiers_apart_and_resumes_from_remote(
    gcs_bucket: str, gcs_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    local, remote = tmp_path / "local", gcs_bucket + "/run"
    options = CheckpointManagerOptions(max_to_keep=1)
    with CheckpointManager(
        local,
        options,
        remote=remote,
        remote_retention=KeepEveryNSteps(2),
        storage_options=gcs_storage_options,
    ) as mgr:
        for step in range(1, 6):
            mgr.save(step, state(step))
        mgr.wait_until_finished()
        # A local step still being uploaded when retention ran stays until the next
        # save or prune (the upload holds it).
        mgr.prune()
        assert sorted(p.name for p in local.glob("step_*")) == ["step_00000005"]
        assert mgr.all_steps() == [2, 4, 5]
    shutil.rmtree(local)  # a new machine: only the bucket is left
    with CheckpointManager(
        local, options, remote=remote, storage_options=gcs_storage_options
    ) as mgr:
        assert mgr.latest_step() == 5
        assert_restores(mgr, 4)  # downloaded into the local directory first
        assert (local / "step_00000004" / "checkpoint.json").is_file()


UPLOADER = """
import sys, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import s3_options
opts = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lease_secs=2)
mgr = CheckpointManager(sys.argv[1], opts, storage_options=s3_options(sys.argv[2]))
mgr.save(7, {"w": torch.ones(16 << 20)})  # 64 MiB: several multipart chunks
"""


def test_killed_upload_leaves_no_visible_step(
    s3_bucket: str, s3_proxy: Proxied, s3_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    """Killed while the commit record is in flight: the data is there, the step is not."""
    url = s3_bucket + "/run"
    s3_proxy.proxy.inject("stall", 1, match="checkpoint.json", seconds=60)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(UPLOADER), url, s3_proxy.proxy.url],
        cwd=Path(__file__).parent,
    )
    deadline = time.monotonic() + 60
    while not any("checkpoint.json" in r for r in map(str, s3_proxy.proxy.requests)):
        assert time.monotonic() < deadline and child.poll() is None, "the record never went out"
        time.sleep(0.05)
    child.kill()
    child.wait()
    fs = fresh_fs("s3", s3_storage_options)
    assert any(p.endswith(".safetensors") for p in fs.find(url)), "the data was uploaded"
    with CheckpointManager(
        url, SYNC, storage_options=s3_storage_options, cache_dir=tmp_path
    ) as mgr:
        assert mgr.all_steps() == [], "no commit record, no step"
        assert mgr.save(7, state(7)), "the step is saved again from scratch"
        assert_restores(mgr, 7)


INCREMENTAL_SAVER = """
import sys, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import s3_options
opts = CheckpointManagerOptions(
    enable_async_checkpointing=False, max_to_keep=2, incremental=True, writer_lease_secs=2
)
with CheckpointManager(sys.argv[1], opts, storage_options=s3_options(sys.argv[2]),
                       cache_dir=sys.argv[4]) as mgr:
    step = int(sys.argv[3])
    while True:
        print("saving", step, flush=True)
        mgr.save(step, {"base": {"w": torch.arange(1 << 19, dtype=torch.float32)},
                        "adapter": {"w": torch.full((4096,), float(step))}, "step": step})
        print("saved", step, flush=True)
        step += 1
"""


def test_sigkill_during_incremental_saves_to_a_bucket_leaves_only_whole_steps(
    s3_bucket: str, s3_storage_options: dict[str, Any], s3_server: Any, tmp_path: Path
) -> None:
    """Incremental saves straight to S3, the saver SIGKILLed at random moments (uploading,
    committing, deleting by retention): every listed step restores whole and verifies,
    with the frozen tensors read from the step that holds them, and no step whose save()
    returned is lost."""
    url = s3_bucket + "/run"
    rng = random.Random(7)
    base = torch.arange(1 << 19, dtype=torch.float32)
    latest, typical = -1, 0.0
    for kill in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(INCREMENTAL_SAVER), url, s3_server.url,
             str(latest + 1), str(tmp_path / f"cache-{kill}")],
            cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        said: list[tuple[str, int]] = []
        began = time.monotonic()
        while True:  # the first run measures a save, the others die at a random moment
            word, step = child.stdout.readline().split()
            said.append((word, int(step)))
            if kill == 0 and word == "saved" and int(step) == 3:
                typical = (time.monotonic() - began) / 4
                break
            if kill and word == "saving" and int(step) > latest + 1:
                time.sleep(rng.uniform(0, 1.3) * typical)
                break
        child.kill()
        child.wait()
        saved = max((s for w, s in said if w == "saved"), default=None)
        with CheckpointManager(
            url, CheckpointManagerOptions(read_only=True), storage_options=s3_storage_options,
            cache_dir=tmp_path / f"check-{kill}",
        ) as reader:
            steps = reader.all_steps()
            assert steps, "no step left"
            latest = steps[-1]
            assert saved is None or latest >= saved, f"step {saved} was saved, {steps} left"
            for step in steps:
                restored = reader.restore(step=step)
                assert restored is not None and restored["step"] == step
                assert torch.equal(restored["base"]["w"], base)
                assert torch.equal(restored["adapter"]["w"], torch.full((4096,), float(step)))
                reader.verify(step)
        if kill == 0:  # retention kept step 0 for the frozen tensors later steps read
            assert steps[0] == 0 and 0 not in steps[-2:], steps
    assert latest > 5, f"the saves did not get far: {latest}"


RESTORER = """
import sys, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import s3_options
opts = CheckpointManagerOptions(read_only=True)
with CheckpointManager(sys.argv[1], opts, storage_options=s3_options(sys.argv[2]),
                       cache_dir=sys.argv[3]) as mgr:
    assert torch.equal(mgr.restore()["x"]["w"], torch.arange(1 << 20))
"""


def test_processes_of_a_node_download_a_step_once(
    s3_bucket: str, s3_proxy: Proxied, s3_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    """4 processes restore the same remote step through one cache directory at once:
    one downloads (under the file lock), the others use its verified copy."""
    url = s3_bucket + "/run"
    with CheckpointManager(url, SYNC, storage_options=s3_storage_options) as mgr:
        mgr.save(3, {"x": {"w": torch.arange(1 << 20)}})
    s3_proxy.proxy.inject("stall", 1, match="x.safetensors", seconds=1)  # let them pile up
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(RESTORER),
                url,
                s3_proxy.proxy.url,
                str(tmp_path / "cache"),
            ],
            cwd=Path(__file__).parent,
        )
        for _ in range(4)
    ]
    assert [c.wait(timeout=120) for c in children] == [0] * 4
    requests = map(str, s3_proxy.proxy.requests)
    data_gets = [r for r in requests if r.startswith("GET") and "x.safetensors" in r]
    assert len(data_gets) == 1, data_gets
