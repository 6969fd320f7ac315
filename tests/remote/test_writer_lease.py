"""One writer per object-store directory: the writer lease, on S3 and GCS alike."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Store, fresh_fs

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    DirectoryLockedError,
)

TTL = 1.5
OPTS = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lease_secs=TTL)
READ = CheckpointManagerOptions(read_only=True)


def state(step: int, n: int = 1 << 10) -> dict[str, Any]:
    return {"w": torch.full((n,), float(step))}


def restored(mgr: CheckpointManager, step: int) -> float:
    out = mgr.restore(step=step)
    assert out is not None
    return float(out["w"][0])


def test_a_second_writer_is_refused_while_the_first_renews(store: Store) -> None:
    # A lease long enough to be renewed in time on a loaded 2-core CI machine: with the
    # 1.5 s of the other tests, a renewal once came late and the second writer took over
    # (as it should, from a writer that stops renewing).
    ttl = 4.0
    opts = dataclasses.replace(OPTS, writer_lease_secs=ttl)
    url = store.bucket + "/run"
    with CheckpointManager(url, opts, storage_options=store.options) as first:
        first.save(1, state(1))
        with pytest.raises(DirectoryLockedError, match="holds the writer lease"):
            CheckpointManager(url, opts, storage_options=store.options)
        time.sleep(ttl)  # renewals go on
        with pytest.raises(DirectoryLockedError):
            CheckpointManager(url, opts, storage_options=store.options)
        with CheckpointManager(url, READ, storage_options=store.options) as reader:
            assert reader.all_steps() == [1], "readers never need the lease"
        first.save(2, state(2))
    started = time.monotonic()
    with CheckpointManager(url, opts, storage_options=store.options) as second:
        assert time.monotonic() - started < ttl, "a released lease is free at once"
        assert second.all_steps() == [1, 2]


def race_to_open(url: str, store: Store, writers: int) -> list[object]:
    """Open ``writers`` managers of ``url`` at once; what each got."""
    start = threading.Barrier(writers)
    outcomes: list[object] = []

    def open_one() -> None:
        start.wait()
        try:
            outcomes.append(CheckpointManager(url, OPTS, storage_options=store.options))
        except DirectoryLockedError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_of_writers_racing_to_open_exactly_one_wins(store: Store) -> None:
    for attempt in range(4):
        outcomes = race_to_open(f"{store.bucket}/race{attempt}", store, 3)
        winners = [o for o in outcomes if isinstance(o, CheckpointManager)]
        assert len(winners) == 1, outcomes
        winners[0].close()


def test_a_writer_opened_mid_upload_leaves_the_step_in_flight_alone(store: Store) -> None:
    """The trial's finding: a second writable manager deleted a step being uploaded."""
    url = store.bucket + "/run"
    with CheckpointManager(url, OPTS, storage_options=store.proxied) as first:
        first.save(1, state(1))
        store.proxy.inject("delay", 1, match="tensors.safetensors", seconds=2 * TTL)
        saving = threading.Thread(target=first.save, args=(2, state(2, 1 << 20)))
        saving.start()
        while not store.proxy.injected:
            time.sleep(0.01)
        with pytest.raises(DirectoryLockedError):
            CheckpointManager(url, OPTS, storage_options=store.options)
        saving.join()
        assert first.all_steps() == [1, 2]
    with CheckpointManager(url, OPTS, storage_options=store.options) as after:
        assert after.all_steps() == [1, 2] and restored(after, 2) == 2.0


WRITER = """
import sys, time, torch
from checkpointing import CheckpointManager, CheckpointManagerOptions
from conftest import gcs_options, s3_options
options = (s3_options if sys.argv[2] == "s3" else gcs_options)(sys.argv[3])
opts = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lease_secs=1.5)
mgr = CheckpointManager(sys.argv[1], opts, storage_options=options)
mgr.save(1, {"w": torch.ones(4)})
print("saved", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_lease_is_waited_out(store: Store) -> None:
    """A writer killed with its lease held keeps the next one waiting for the rest of
    that lease only: a job restarted after a preemption just starts."""
    url = store.bucket + "/run"
    endpoint = store.options.get("endpoint_url") or store.options["client_kwargs"]["endpoint_url"]
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, store.kind, endpoint],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "saved\n"
    child.kill()
    child.wait()
    started = time.monotonic()
    with CheckpointManager(url, OPTS, storage_options=store.options) as second:
        assert time.monotonic() - started < 3 * TTL
        assert second.all_steps() == [1]
        second.save(2, state(2))


def test_a_writer_cut_off_past_its_lease_stops_writing(store: Store) -> None:
    """Fencing: the writer whose lease another took over cannot commit, delete or clean
    up, so it never clobbers the new writer's steps."""
    url = store.bucket + "/run"
    first = CheckpointManager(url, OPTS, storage_options=store.proxied)
    first.save(1, state(1))
    store.proxy.inject("http_error", 10**6, match=".lock", status=403)  # renewals fail
    with CheckpointManager(url, OPTS, storage_options=store.options) as second:
        second.save(2, state(2))
        store.proxy.clear()
        with pytest.raises(DirectoryLockedError, match="lost the writer lease"):
            first.save(3, state(3))
        first.close()
        second.save(3, state(30))
        assert second.all_steps() == [1, 2, 3]
        assert restored(second, 3) == 30.0
    fs = fresh_fs(store.protocol, store.options)
    leftovers = [p for p in fs.find(url) if "step_00000003" in p and "safetensors" in p]
    assert len(leftovers) == 1, "the fenced writer's files were never committed"
