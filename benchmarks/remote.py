"""Remote save/restore throughput through moto (S3) and fake-gcs-server (GCS).

    .venv/bin/python benchmarks/remote.py --size-gb 0.5 --rounds 5

In one run, methods interleaved per round (taking turns at going first, each after
``--settle`` idle seconds), against a fresh bucket per round, removed afterwards:
- ours: `CheckpointManager("s3://...")` durable save; download (the step into a fresh
  cache, durably, checked while copied: what a restore does first); restore (download,
  then read in place);
- raw: s3fs/gcsfs `put` of the very files our save wrote, and `get` of them (also with
  the downloaded files fsync'd, as durable as our download);
- mirrored save: blocking time of an async save to a local directory with ``remote=``
  set, against the same save without a remote (the upload runs in the background); and
  while the remote is down: its port refusing connections, or a proxy in front of it
  that accepts connections and never answers.
The servers run on loopback, so this measures client overhead, not a network.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "remote"))
import conftest as servers
from _common import GB, Spread, format_table, fsync_tree, timed, transformer_with_adam
from faultproxy import FaultProxy

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.storage import FsspecStorage, open_storage
from checkpointing.storage.cache import StepCache

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)
T = TypeVar("T")


def start_servers(log_dir: Path) -> dict[str, tuple[servers.Server, dict[str, Any]]]:
    moto = servers._start(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"],
        "/",
        log_dir,
    )
    gcs_argv = [
        str(servers.fake_gcs_server_binary()),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        "{port}",
        "-backend",
        "memory",
        "-log-level",
        "error",
    ]
    gcs = servers._start("fake-gcs-server", gcs_argv, "/storage/v1/b", log_dir)
    return {"s3": (moto, servers.s3_options(moto.url)), "gs": (gcs, servers.gcs_options(gcs.url))}


def new_bucket(protocol: str, options: dict[str, Any]) -> str:
    fs = servers.fresh_fs(protocol, options)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    if protocol == "s3":
        fs.call_s3("create_bucket", Bucket=name)
    else:
        fs.mkdir(name)
    return f"{protocol}://{name}"


def turns(r: int, methods: list[T]) -> list[T]:
    """``methods`` rotated by round ``r``: each goes first as often as the others."""
    shift = r % len(methods)
    return methods[shift:] + methods[:shift]


def step_of(bucket: str, options: dict[str, Any]) -> tuple[FsspecStorage, str, Record, list[str]]:
    """What a restore of step 1 of ``bucket/ours`` asks the cache for."""
    remote = open_storage(f"{bucket}/ours", create=False, storage_options=options)
    assert isinstance(remote, FsspecStorage)
    folder = "step_00000001"
    record = Record.from_json(remote.read_bytes(f"{folder}/{RECORD_NAME}", 1 << 30), folder)
    return remote, folder, record, list(record.files)


def dead_endpoint() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="idle seconds before each timed operation"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    started = start_servers(work)
    model, optimizer = transformer_with_adam(int(args.size_gb * GB))
    state = {"model": model, "optimizer": optimizer}
    local = work / "local"
    with CheckpointManager(local, SYNC) as mgr:
        mgr.save(0, state)
    files = local / "step_00000000"
    nbytes = sum(f.stat().st_size for f in files.iterdir())
    nfiles = len(os.listdir(files)) - 1  # data files, without the commit record
    times: dict[str, list[float]] = {}

    def record(name: str, fn: Callable[[], Any], settle: float) -> None:
        time.sleep(settle)
        times.setdefault(name, []).append(timed(fn)[0])

    try:
        for r in range(args.rounds):
            for protocol, (_, options) in started.items():
                bucket = new_bucket(protocol, options)
                fs = servers.fresh_fs(protocol, options)
                mgr = CheckpointManager(
                    f"{bucket}/ours", SYNC, storage_options=options, cache_dir=work / "cache"
                )

                def ours_save(mgr: CheckpointManager = mgr) -> None:
                    mgr.save(1, state)

                def raw_put(fs: Any = fs, bucket: str = bucket) -> None:
                    fs.put(str(files), f"{bucket}/raw", recursive=True)

                def raw_get(fs: Any = fs, bucket: str = bucket) -> None:
                    fs.get(f"{bucket}/raw", str(work / "get"), recursive=True)

                def durable_get() -> None:
                    raw_get()
                    fsync_tree(work / "get")

                # Each pair takes turns at going first; every operation starts settled.
                writes: list[tuple[str, Callable[[], Any]]] = [
                    ("ours save", ours_save), ("raw put", raw_put)]
                for name, fn in turns(r, writes):
                    record(f"{protocol}: {name}", fn, settle=args.settle)
                wanted = step_of(bucket, options)  # as a restore has it before downloading

                def ours_download(wanted: Any = wanted) -> None:
                    with StepCache(work / "fetched").holding(*wanted):
                        pass

                reads: list[tuple[str, Callable[[], Any]]] = [
                    ("ours download", ours_download),
                    ("raw get", raw_get),
                    ("raw get + fsync", durable_get),
                    ("ours restore", functools.partial(mgr.restore, state)),
                ]
                for name, fn in turns(r, reads):
                    for leftover in ("cache", "fetched", "get"):
                        shutil.rmtree(work / leftover, ignore_errors=True)
                    record(f"{protocol}: {name}", fn, settle=args.settle)
                mgr.close()
                fs.rm(bucket, recursive=True)  # keep the servers' memory level
            s3_server, s3_options = started["s3"]
            with FaultProxy(s3_server.port) as stalled:
                stalled.inject("stall", 10**6, seconds=3600)
                remotes = [
                    ("local save", None, s3_options),
                    ("mirrored save (to s3)", "up", s3_options),
                    ("mirrored save, s3 refusing", "down", servers.s3_options(dead_endpoint())),
                    ("mirrored save, s3 stalled", "down", servers.s3_options(stalled.url)),
                ]
                for label, remote, options in turns(r, remotes):
                    directory = work / "mirror"
                    shutil.rmtree(directory, ignore_errors=True)
                    url = new_bucket("s3", s3_options) + "/run" if remote else None
                    opts = CheckpointManagerOptions(enable_async_checkpointing=True)
                    with CheckpointManager(
                        directory, opts, remote=url, storage_options=options
                    ) as mgr:
                        mgr.save(1, state)  # warms the snapshot buffers
                        if remote == "up":
                            mgr.wait_until_finished()  # the upload too
                        while mgr.is_saving_in_progress():  # the local save (remote down)
                            time.sleep(0.01)
                        saved = lambda mgr=mgr: mgr.save(2, state)  # noqa: E731
                        record(f"blocking: {label}", saved, settle=args.settle)
                        if remote == "down":
                            status = mgr.mirror_status()
                            assert status is not None and status.last_error is not None
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for server, _ in started.values():
            servers._stop(server)
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name, samples in times.items():
        spread = Spread.of(samples)
        # restore = download + reading into the model: no raw counterpart
        raw = name.replace("ours save", "raw put").replace("ours download", "raw get")
        ratio = ""
        if raw != name:
            ratio = f"{Spread.of(times[raw]).median / spread.median:.2f}"
        rows.append(
            [
                name,
                f"{spread.median:.3f}",
                f"{spread.lo:.3f}-{spread.hi:.3f}",
                f"{nbytes / spread.median / 1e6:.0f}",
                ratio,
            ]
        )
    print(
        f"state: {nbytes / 1e9:.2f} GB in {nfiles} data files, "
        f"{args.rounds} rounds, loopback servers"
    )
    print(format_table(["method", "median s", "min-max s", "MB/s", "ours vs raw (>=0.9)"], rows))


if __name__ == "__main__":
    main()
