"""The `checkpointing` command on S3 and GCS, with options given as a user types them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Store

from checkpointing import CheckpointManager, CheckpointManagerOptions

SCRIPT = str(Path(sys.executable).parent / "checkpointing")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def flags(options: dict[str, Any], prefix: str = "") -> list[str]:
    """``--storage-option`` flags for ``options``, dotted keys for nested ones."""
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += flags(value, f"{prefix}{key}.")
        else:
            out += ["--storage-option", f"{prefix}{key}={value}"]
    return out


def user_flags(store: Store) -> list[str]:
    found = flags(store.options)
    if store.kind == "s3":  # a JSON value: s3fs builds botocore's Config from the dict
        found += ["--storage-option", 'config_kwargs={"read_timeout": 30}']
    return found


@pytest.fixture
def local(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    opts = CheckpointManagerOptions(enable_async_checkpointing=False)
    with CheckpointManager(directory, opts) as mgr:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
            mgr.save(step, {"w": torch.full((64,), float(step))}, metrics={"loss": loss})
        mgr.protect(10)
    with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as evaluator:
        evaluator.record_metrics(20, {"accuracy": 0.9})
    return directory


def test_sync_to_a_bucket_then_list_and_verify_it(store: Store, local: Path) -> None:
    url, options = store.bucket + "/run", user_flags(store)
    dry = run("sync", str(local), url, "--dry-run", *options)
    assert dry.returncode == 0 and "would copy 3 step(s): 10 20 30" in dry.stdout, dry.stderr
    assert json.loads(run("ls", url, "--json", *options).stdout) == []
    out = run("sync", str(local), url, *options)
    assert out.returncode == 0 and "copied 3 step(s): 10 20 30" in out.stdout, out.stderr
    rows = {r["step"]: r for r in json.loads(run("ls", url, "--json", *options).stdout)}
    assert rows[20]["metrics"] == {"loss": 0.2, "accuracy": 0.9}
    assert "protected" in rows[10]["reasons"]
    checked = run("verify", url, "--all", *options)
    assert checked.returncode == 0 and checked.stdout.count(": ok") == 3, checked.stderr
    back = run("sync", url, str(local.parent / "back"), *options)  # and down again
    assert "copied 3 step(s)" in back.stdout, back.stderr


def test_ls_shows_what_the_remote_of_a_mirror_lacks(store: Store, local: Path) -> None:
    url, options = store.bucket + "/run", user_flags(store)
    assert run("sync", str(local), url, *options).returncode == 0
    with CheckpointManager(local, CheckpointManagerOptions(enable_async_checkpointing=False)) as m:
        m.save(40, {"w": torch.zeros(4)})  # not mirrored: the remote lacks it
        m.delete(20)  # on the remote only now
    out = run("ls", str(local), "--remote", url, *options)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"remote {url}: 3 step(s), lacks 40"
    rows = {int(line.split()[0]): line for line in lines[2:] if line.split()[0].isdigit()}
    assert "remote too" in rows[10] and "not remote" in rows[40]
    assert "on the remote only" in rows[20] and "accuracy" in rows[20]
    listed = json.loads(run("ls", str(local), "--remote", url, "--json", *options).stdout)
    tiers = {r["step"]: (r["local"], r["remote"]) for r in listed}
    assert tiers == {10: (True, True), 20: (False, True), 30: (True, True), 40: (True, False)}


def dead_flags(store: Store) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "client_kwargs.endpoint_url" if store.kind == "s3" else "endpoint_url"
    found = user_flags(store)
    at = found.index(next(f for f in found if f.startswith(f"{key}=")))
    found[at] = f"{key}=http://127.0.0.1:{port}"
    return found


def test_a_dead_endpoint_is_one_line_within_seconds(store: Store, local: Path) -> None:
    """The trial's finding: a wrong endpoint hung for 2+ minutes, then a traceback."""
    url, dead = store.bucket + "/run", dead_flags(store)
    commands = (["ls", url], ["verify", url], ["sync", str(local), url])
    with ThreadPoolExecutor(len(commands) + 1) as pool:  # each waits for an answer
        failing = [pool.submit(run, *command, *dead, timeout=90) for command in commands]
        # The local directory of a mirror still lists, saying what the remote could not.
        mirrored = pool.submit(run, "ls", str(local), "--remote", url, *dead, timeout=90)
    failed = [future.result() for future in failing]
    for out in failed:
        assert out.returncode == 2, (out.args, out.stdout, out.stderr)
        assert out.stderr.startswith("checkpointing: error:") and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert url in out.stderr or store.bucket in out.stderr, out.stderr
    out = mirrored.result()
    assert out.returncode == 0 and out.stdout.count("not remote") == 3, out.stderr
    assert out.stderr.startswith("checkpointing: warning:") and len(out.stderr.splitlines()) == 1
