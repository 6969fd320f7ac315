"""Readers of a bucket directory, on S3 and GCS alike: evaluation jobs in other processes
whose metrics drive the trainer's best-N, a run deleted and re-created at one URL, and
the download cache's bound over many steps."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Store, fresh_fs

from checkpointing import CheckpointManager, CheckpointManagerOptions

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lease_secs=2)
READ = CheckpointManagerOptions(read_only=True)


def endpoint(store: Store) -> str:
    options = store.options
    return str(options.get("endpoint_url") or options["client_kwargs"]["endpoint_url"])


def restored(mgr: CheckpointManager, step: int, **kwargs: Any) -> dict[str, float]:
    out = mgr.restore(step=step, **kwargs)
    assert out is not None
    return {name: float((v["t"] if isinstance(v, dict) else v)[0]) for name, v in out.items()}


EVALUATOR = """
import sys
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import gcs_options, s3_options
url, kind, endpoint, cache, last = sys.argv[1:]
options = (s3_options if kind == "s3" else gcs_options)(endpoint)
ACC = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.5, 5: 0.3, 6: 0.4}
opts = CheckpointManagerOptions(read_only=True)
with CheckpointManager(url, opts, storage_options=options, cache_dir=cache) as mgr:
    for step in mgr.iter_new_checkpoints(timeout=120, poll_interval_secs=0.1, every_step=True):
        assert float(mgr.restore(step=step)["w"][0]) == step
        mgr.record_metrics(step, {"eval": {"acc": ACC[step]}})
        if step == int(last):
            break
"""


def test_an_evaluators_metrics_drive_the_trainers_best_n(store: Store, tmp_path: Path) -> None:
    """The trial's finding: on s3:// the trainer never saw recorded metrics, so best-N by
    an evaluation metric ranked nothing."""
    url = store.bucket + "/run"
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False,
        writer_lease_secs=2,
        max_to_keep=2,
        best_metric="eval/acc",
        best_mode="max",
    )
    with CheckpointManager(url, options, storage_options=store.options) as trainer:
        evaluator = subprocess.Popen(
            [sys.executable, "-c", EVALUATOR, url, store.kind, endpoint(store), str(tmp_path), "6"],
            cwd=Path(__file__).parent,
        )
        try:
            for step in range(1, 7):
                trainer.save(step, {"w": torch.full((8,), float(step))})
                deadline = time.monotonic() + 60
                while (trainer.metrics(step) or {}).get("eval") is None:
                    assert time.monotonic() < deadline, f"no metrics for step {step}"
                    assert evaluator.poll() in (None, 0), "the evaluator failed"
                    time.sleep(0.1)
                    trainer.reload()
            assert evaluator.wait(timeout=60) == 0
        finally:
            evaluator.kill()
        trainer.prune()
        assert trainer.all_steps() == [2, 4, 6], "the best two by eval/acc, and the newest"
        assert trainer.best_step() == 2
    with CheckpointManager(url, READ, storage_options=store.options) as fresh:
        assert fresh.metrics(2) == {"eval": {"acc": 0.9}}


def write_run(url: str, store: Store, values: dict[int, float]) -> None:
    with CheckpointManager(url, SYNC, storage_options=store.options) as writer:
        for step, value in values.items():
            writer.save(step, {"w": torch.full((64,), value)})


def test_a_run_deleted_and_recreated_at_one_url(store: Store, tmp_path: Path) -> None:
    """The trial's finding: the cache, keyed by URL and step, served the old run (or a
    permanent CorruptCheckpointError blaming the remote file)."""
    url, cache = store.bucket + "/run", tmp_path / "cache"
    write_run(url, store, {1: 1.0, 2: 2.0})
    reader = CheckpointManager(url, READ, storage_options=store.options, cache_dir=cache)
    assert restored(reader, 2) == {"w": 2.0}
    fresh_fs(store.protocol, store.options).rm(url, recursive=True)
    write_run(url, store, {1: 10.0, 2: 20.0})
    # Step 1 was never read: its old record no longer matches the files; read anew.
    assert restored(reader, 1) == {"w": 10.0}
    reader.reload()  # the record of step 2 was replaced: read again
    assert restored(reader, 2) == {"w": 20.0}
    reader.close()
    for verify in (True, False):
        options = CheckpointManagerOptions(read_only=True, verify_checksums=verify)
        with CheckpointManager(url, options, storage_options=store.options, cache_dir=cache) as m:
            assert restored(m, 2) == {"w": 20.0} and restored(m, 1) == {"w": 10.0}


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def test_an_evaluator_over_many_steps_stays_within_the_cache_bound(
    store: Store, tmp_path: Path
) -> None:
    url, cache = store.bucket + "/run", tmp_path / "cache"
    item = 1 << 16  # float32 elements: 256 KiB per item, two items per step
    with CheckpointManager(url, SYNC, storage_options=store.options) as writer:
        for step in range(1, 13):
            a, b = torch.full((item,), float(step)), torch.zeros(item)
            writer.save(step, {"a": {"t": a}, "b": {"t": b}})  # a.safetensors, b.safetensors
    bound = 3 * (4 * item) + 4096  # three items' files
    with CheckpointManager(
        url, READ, storage_options=store.proxied, cache_dir=cache, cache_max_bytes=bound
    ) as evaluator:
        for step in evaluator.all_steps():
            assert restored(evaluator, step) == {"a": float(step), "b": 0.0}
            assert cache_bytes(cache) <= bound
        entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1, "one step's files fit, two steps' do not"
        # A partial restore downloads its items' files only.
        store.proxy.requests.clear()
        assert restored(evaluator, 3, items=["a"]) == {"a": 3.0}
        gets = [r for r in map(str, store.proxy.requests) if "safetensors" in r]
        assert gets and all("b.safetensors" not in r for r in gets), gets


def test_a_missing_bucket_is_an_error_for_readers_too(store: Store, tmp_path: Path) -> None:
    """A reader of a mistyped bucket saw an empty directory: an evaluation job waited
    forever, `checkpointing ls` listed nothing and exited 0 (a new user's trial)."""
    from checkpointing import RemoteStorageError, checkpoints_iterator

    missing = f"{store.protocol}://no-such-bucket-{uuid.uuid4().hex[:12]}/run1"
    with pytest.raises(RemoteStorageError, match="there is no bucket"):
        CheckpointManager(missing, READ, storage_options=store.options)
    with pytest.raises(RemoteStorageError, match="there is no bucket"):
        next(checkpoints_iterator(missing, timeout=5, storage_options=store.options))
    not_yet = f"{store.bucket}/not-made-yet"  # a bucket without the run: it may come
    with CheckpointManager(not_yet, READ, storage_options=store.options) as mgr:
        assert mgr.all_steps() == []
