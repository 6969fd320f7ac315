"""Remote save/restore throughput through moto (S3) and fake-gcs-server (GCS).

    .venv/bin/python benchmarks/remote.py --size-gb 0.5 --rounds 3

In one run, methods interleaved per round, each against a fresh bucket:
- ours: `CheckpointManager("s3://...")` durable save; download (the step into a fresh
  cache, durably, checked while copied: what a restore does first); restore (download,
  then read in place);
- raw: s3fs/gcsfs `put` of the very files our save wrote, and `get` of them (also with
  the downloaded files fsync'd, as durable as our download);
- mirrored save: blocking time of a save to a local directory with ``remote=`` set,
  against the same save without a remote (the upload runs in the background).
The servers run on loopback, so this measures client overhead, not a network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "remote"))
import conftest as servers
from _common import GB, Spread, format_table, fsync_tree, timed, transformer_with_adam

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.storage.cache import fetch_step

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
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

    def record(name: str, fn: Callable[[], Any]) -> None:
        times.setdefault(name, []).append(timed(fn)[0])

    try:
        for _ in range(args.rounds):
            for protocol, (_, options) in started.items():
                bucket = new_bucket(protocol, options)
                fs = servers.fresh_fs(protocol, options)
                url = f"{bucket}/ours"
                mgr = CheckpointManager(
                    url, SYNC, storage_options=options, cache_dir=work / "cache"
                )
                record(f"{protocol}: ours save", lambda: mgr.save(1, state))
                record(
                    f"{protocol}: raw put",
                    lambda: fs.put(str(files), f"{bucket}/raw", recursive=True),
                )
                shutil.rmtree(work / "cache", ignore_errors=True)
                record(f"{protocol}: ours download", lambda: fetch_step(
                    mgr._storage, "step_00000001", mgr._records[1], work / "fetched"))
                shutil.rmtree(work / "fetched", ignore_errors=True)
                record(f"{protocol}: ours restore", lambda: mgr.restore(state))
                shutil.rmtree(work / "get", ignore_errors=True)
                record(
                    f"{protocol}: raw get",
                    lambda: fs.get(f"{bucket}/raw", str(work / "get"), recursive=True),
                )
                shutil.rmtree(work / "get", ignore_errors=True)

                def durable_get() -> None:
                    fs.get(f"{bucket}/raw", str(work / "get"), recursive=True)
                    fsync_tree(work / "get")

                record(f"{protocol}: raw get + fsync", durable_get)
                mgr.close()
            for mirrored in (False, True):
                directory = work / f"mirror-{mirrored}"
                shutil.rmtree(directory, ignore_errors=True)
                remote = new_bucket("s3", started["s3"][1]) + "/run" if mirrored else None
                opts = CheckpointManagerOptions(enable_async_checkpointing=True)
                with CheckpointManager(
                    directory, opts, remote=remote, storage_options=started["s3"][1]
                ) as mgr:
                    mgr.save(1, state)  # warms the snapshot buffers
                    mgr.wait_until_finished()
                    label = "mirrored save (to s3)" if mirrored else "local save"
                    record(f"blocking: {label}", lambda: mgr.save(2, state))
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
