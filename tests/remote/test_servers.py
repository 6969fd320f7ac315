"""Smoke tests of the remote fixtures: real s3fs/gcsfs over HTTP to moto / fake-gcs-server.

The fault tests also pin down how the clients retry and which exceptions surface once they
give up (see NOTES.md); a client upgrade that changes this should fail here first.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import fsspec
import pytest
from conftest import Proxied, Server, fresh_fs, s3_options
from faultproxy import FaultProxy
from fsspec.exceptions import FSTimeoutError

botocore_exceptions = pytest.importorskip("botocore.exceptions")
MiB = 2**20


def s3fs_with(storage_options: dict[str, Any], s3fs_retries: int = 5, **config: Any) -> Any:
    """An S3 filesystem with botocore ``config`` and s3fs's own retry count."""
    fs = fresh_fs("s3", {**storage_options, "config_kwargs": config})
    fs.retries = s3fs_retries  # s3fs's outer loop around each botocore call (class default 5)
    return fs


NO_RETRIES: dict[str, Any] = {"retries": {"total_max_attempts": 1}}


def roundtrip(fs: fsspec.AbstractFileSystem, root: str, tmp_path: Path) -> None:
    """put/get/pipe/cat/ls/rm of a few objects under ``root``, checked through ``fs``."""
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(1000))
    fs.put(str(local), f"{root}/dir/a.bin")
    fs.pipe({f"{root}/dir/b.txt": b"bee", f"{root}/dir/sub/c.txt": b"sea", f"{root}/top": b"t"})
    assert sorted(fs.ls(f"{root}/dir", detail=False)) == [
        f"{root}/dir/a.bin".split("://")[1],
        f"{root}/dir/b.txt".split("://")[1],
        f"{root}/dir/sub".split("://")[1],
    ]
    assert fs.cat(f"{root}/dir/b.txt") == b"bee"
    fs.get(f"{root}/dir/a.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert fs.info(f"{root}/dir/a.bin")["size"] == 1000
    assert len(fs.find(root)) == 4
    fs.rm(f"{root}/dir", recursive=True)
    assert fs.find(root) == [f"{root}/top".split("://")[1]]
    assert not fs.exists(f"{root}/dir/b.txt")


def listings_stay_fresh(protocol: str, options: dict[str, Any], root: str) -> None:
    writer, reader = fresh_fs(protocol, options), fresh_fs(protocol, options)
    assert writer is not reader
    assert reader.ls(root) == []
    writer.pipe(f"{root}/x", b"1")
    assert reader.ls(root, detail=False) == [f"{root}/x".split("://")[1]]
    writer.rm(f"{root}/x")
    assert reader.ls(root) == [] and writer.ls(root) == []


def ranged_reads(fs: fsspec.AbstractFileSystem, path: str) -> None:
    data = os.urandom(2 * MiB)
    fs.pipe(path, data)
    with fs.open(path, "rb", block_size=256 * 1024) as f:
        f.seek(1_500_000)
        assert f.read(1000) == data[1_500_000:1_501_000]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
    assert fs.cat_file(path, start=10, end=20) == data[10:20]


# -- S3 ----------------------------------------------------------------------------------------


def test_s3_roundtrip(s3_bucket: str, s3_storage_options: dict[str, Any], tmp_path: Path) -> None:
    roundtrip(fresh_fs("s3", s3_storage_options), s3_bucket, tmp_path)


def test_s3_buckets_are_per_test(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    assert fresh_fs("s3", s3_storage_options).ls(s3_bucket) == []


def test_s3_listings_stay_fresh(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    listings_stay_fresh("s3", s3_storage_options, s3_bucket)


def test_s3_ranged_reads(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    ranged_reads(fresh_fs("s3", s3_storage_options), f"{s3_bucket}/ranged.bin")


def test_s3_multipart_upload(s3_bucket: str, s3_proxy: Proxied, tmp_path: Path) -> None:
    fs = fresh_fs("s3", s3_proxy.storage_options)
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(11 * MiB))
    # s3fs goes multipart only from 2 chunks up: 11 MiB in 5 MiB chunks is 3 parts.
    fs.put(str(local), f"{s3_bucket}/big.bin", chunksize=5 * MiB)
    parts = [r for r in s3_proxy.proxy.requests if "partNumber=" in r]
    assert len(parts) == 3 and all(r.startswith("PUT ") for r in parts)
    assert fs.info(f"{s3_bucket}/big.bin")["ETag"].strip('"').endswith("-3")
    got = fs.cat(f"{s3_bucket}/big.bin")
    assert hashlib.sha256(got).digest() == hashlib.sha256(local.read_bytes()).digest()
    # A streamed write uploads a part whenever block_size (>= 5 MiB) bytes are buffered.
    data = os.urandom(6 * MiB)
    with fs.open(f"{s3_bucket}/streamed.bin", "wb", block_size=5 * MiB) as f:
        for i in range(6):
            f.write(data[i * MiB : (i + 1) * MiB])
    assert fs.info(f"{s3_bucket}/streamed.bin")["ETag"].strip('"').endswith("-2")
    assert fs.cat(f"{s3_bucket}/streamed.bin") == data


def test_s3_missing_is_file_not_found(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    fs = fresh_fs("s3", s3_storage_options)
    calls: list[Callable[[], object]] = [
        lambda: fs.ls("s3://no-such-bucket-x1"),  # NoSuchBucket
        lambda: fs.cat("s3://no-such-bucket-x1/key"),
        lambda: fs.pipe("s3://no-such-bucket-x1/key", b"x"),
        lambda: fs.cat(f"{s3_bucket}/no-such-key"),  # NoSuchKey (HEAD 404)
        lambda: fs.open(f"{s3_bucket}/no-such-key", "rb"),
    ]
    for call in calls:
        with pytest.raises(FileNotFoundError):
            call()


def test_s3_access_denied_is_permission_error(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options)
    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    s3_proxy.proxy.inject("http_error", 100, status=403, body=denied)
    with pytest.raises(PermissionError):
        fs.ls(s3_bucket)
    with pytest.raises(PermissionError):  # HEAD: no body, so code "403"
        fs.info(f"{s3_bucket}/key")
    assert len(s3_proxy.proxy.injected) == 2  # neither botocore nor s3fs retried


def test_s3_503_is_retried_by_botocore(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options, retries={"mode": "standard", "total_max_attempts": 3})
    s3_proxy.proxy.inject("http_error", 1, match="PUT ")
    fs.pipe(f"{s3_bucket}/k", b"v")
    assert [r.split()[0] for r in s3_proxy.proxy.requests] == ["PUT"] * 2
    assert fs.cat(f"{s3_bucket}/k") == b"v"


def test_s3_503_exhausted_is_oserror(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options, s3fs_retries=2, **NO_RETRIES)
    s3_proxy.proxy.inject("http_error", 100)
    with pytest.raises(OSError) as info:
        fs.pipe(f"{s3_bucket}/k", b"v")
    # SlowDown is retried by s3fs's own loop too (2 here), then translated to OSError(EBUSY).
    assert len(s3_proxy.proxy.requests) == 2
    assert info.value.errno == errno.EBUSY
    cause = info.value.__cause__
    assert isinstance(cause, botocore_exceptions.ClientError)
    assert cause.response["Error"]["Code"] == "SlowDown"


def test_s3_reset(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options, retries={"mode": "standard", "total_max_attempts": 3})
    fs.pipe(f"{s3_bucket}/k", b"v")
    s3_proxy.proxy.inject("reset", 2)
    assert fs.cat(f"{s3_bucket}/k") == b"v"  # retried by aiohttp / botocore
    fs = s3fs_with(s3_proxy.storage_options, **NO_RETRIES)
    s3_proxy.proxy.inject("reset", 100)
    with pytest.raises(botocore_exceptions.EndpointConnectionError) as info:
        fs.cat(f"{s3_bucket}/k")
    assert not isinstance(info.value, OSError)  # not translated, and not an OSError
    assert isinstance(info.value.__context__, aiohttp.ClientOSError)


def test_s3_truncated_body(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options, s3fs_retries=2, **NO_RETRIES)
    fs.pipe(f"{s3_bucket}/k", os.urandom(200_000))
    s3_proxy.proxy.inject("truncate", 1, match="GET ", after_bytes=5000)
    assert len(fs.cat(f"{s3_bucket}/k")) == 200_000  # s3fs re-reads the body
    s3_proxy.proxy.inject("truncate", 100, match="GET ", after_bytes=5000)
    with pytest.raises(aiohttp.ClientPayloadError):  # raw aiohttp, not translated
        fs.cat(f"{s3_bucket}/k")


def test_s3_stalled_read_times_out(s3_bucket: str, s3_proxy: Proxied) -> None:
    fs = s3fs_with(s3_proxy.storage_options, s3fs_retries=1, read_timeout=0.3, **NO_RETRIES)
    fs.pipe(f"{s3_bucket}/k", b"v")
    s3_proxy.proxy.inject("stall", 100, seconds=5)
    start = time.monotonic()
    with pytest.raises(botocore_exceptions.ReadTimeoutError):
        fs.cat(f"{s3_bucket}/k")
    assert time.monotonic() - start < 3


# -- GCS ---------------------------------------------------------------------------------------


def test_gcs_roundtrip(
    gcs_bucket: str, gcs_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    roundtrip(fresh_fs("gs", gcs_storage_options), gcs_bucket, tmp_path)


def test_gcs_buckets_are_per_test(gcs_bucket: str, gcs_storage_options: dict[str, Any]) -> None:
    assert fresh_fs("gs", gcs_storage_options).ls(gcs_bucket) == []


def test_gcs_listings_stay_fresh(gcs_bucket: str, gcs_storage_options: dict[str, Any]) -> None:
    listings_stay_fresh("gs", gcs_storage_options, gcs_bucket)


def test_gcs_ranged_reads(gcs_bucket: str, gcs_storage_options: dict[str, Any]) -> None:
    ranged_reads(fresh_fs("gs", gcs_storage_options), f"{gcs_bucket}/ranged.bin")


def test_gcs_resumable_upload_stays_on_proxy(gcs_bucket: str, gcs_proxy: Proxied) -> None:
    fs = fresh_fs("gs", gcs_proxy.storage_options)
    data = os.urandom(6 * MiB)
    with fs.open(f"{gcs_bucket}/big.bin", "wb", block_size=2 * MiB) as f:
        f.write(data)
    requests = list(gcs_proxy.proxy.requests)
    assert any("uploadType=resumable" in r for r in requests)
    assert sum("upload_id=" in r for r in requests) >= 2  # chunks went to the Location given
    assert fs.cat(f"{gcs_bucket}/big.bin") == data


def test_gcs_missing_is_file_not_found(
    gcs_bucket: str, gcs_storage_options: dict[str, Any]
) -> None:
    fs = fresh_fs("gs", gcs_storage_options)
    calls: list[Callable[[], object]] = [
        lambda: fs.ls("gs://no-such-bucket-x1"),
        lambda: fs.pipe("gs://no-such-bucket-x1/key", b"x"),
        lambda: fs.cat(f"{gcs_bucket}/no-such-key"),
        lambda: fs.info(f"{gcs_bucket}/no-such-key"),
    ]
    for call in calls:
        with pytest.raises(FileNotFoundError):
            call()


def test_gcs_forbidden_is_plain_oserror(gcs_bucket: str, gcs_proxy: Proxied) -> None:
    fs = fresh_fs("gs", gcs_proxy.storage_options)
    gcs_proxy.proxy.inject(
        "http_error", 100, status=403, body=b'{"error": {"code": 403, "message": "denied"}}'
    )
    with pytest.raises(OSError, match="Forbidden") as info:
        fs.ls(gcs_bucket)
    assert type(info.value) is OSError  # not PermissionError
    assert len(gcs_proxy.proxy.injected) == 1  # not retried


def test_gcs_503_retried_then_http_error(
    gcs_bucket: str, gcs_proxy: Proxied, fast_gcsfs_retries: list[float]
) -> None:
    import gcsfs.retry

    fs = fresh_fs("gs", gcs_proxy.storage_options)
    gcs_proxy.proxy.inject("http_error", 2)
    fs.pipe(f"{gcs_bucket}/k", b"v")
    assert len(fast_gcsfs_retries) == 2
    gcs_proxy.proxy.inject("http_error", 100)
    with pytest.raises(gcsfs.retry.HttpError) as info:
        fs.cat(f"{gcs_bucket}/k")
    assert info.value.code == 503
    assert len(gcs_proxy.proxy.injected) == 2 + 6  # gcsfs: 6 attempts per request


def test_gcs_reset_retried_then_client_os_error(
    gcs_bucket: str, gcs_proxy: Proxied, fast_gcsfs_retries: list[float]
) -> None:
    fs = fresh_fs("gs", gcs_proxy.storage_options)
    gcs_proxy.proxy.inject("reset", 1)
    fs.pipe(f"{gcs_bucket}/k", b"v")
    gcs_proxy.proxy.inject("reset", 100)
    with pytest.raises(aiohttp.ClientOSError) as info:
        fs.cat(f"{gcs_bucket}/k")
    assert isinstance(info.value, OSError)  # ClientOSError is an OSError (ECONNRESET)
    assert info.value.errno == errno.ECONNRESET


def test_gcs_truncated_body_is_retried(
    gcs_bucket: str, gcs_proxy: Proxied, fast_gcsfs_retries: list[float]
) -> None:
    fs = fresh_fs("gs", gcs_proxy.storage_options)
    fs.pipe(f"{gcs_bucket}/k", os.urandom(200_000))
    gcs_proxy.proxy.inject("truncate", 1, match="GET ", after_bytes=5000)
    assert len(fs.cat(f"{gcs_bucket}/k")) == 200_000
    gcs_proxy.proxy.inject("truncate", 100, match="GET ", after_bytes=5000)
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat(f"{gcs_bucket}/k")


def test_gcs_stall_times_out_without_retry(gcs_bucket: str, gcs_proxy: Proxied) -> None:
    fs = fresh_fs("gs", {**gcs_proxy.storage_options, "requests_timeout": 0.3})
    fs.pipe(f"{gcs_bucket}/k", b"v")
    gcs_proxy.proxy.inject("stall", 100, seconds=5)
    with pytest.raises(FSTimeoutError):
        fs.cat(f"{gcs_bucket}/k")
    assert len(gcs_proxy.proxy.injected) == 1


# -- the proxy itself --------------------------------------------------------------------------


def test_proxy_stop_is_bounded_during_a_stall(s3_server: Server) -> None:
    proxy = FaultProxy(s3_server.port).start()
    proxy.inject("stall", 1, seconds=60)
    fs = s3fs_with(s3_options(proxy.url), s3fs_retries=1, read_timeout=30, **NO_RETRIES)
    errors: list[Exception] = []

    def call() -> None:
        try:
            fs.ls("")
        except Exception as e:
            errors.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    while proxy.pending:  # the stall has begun
        time.sleep(0.01)
    start = time.monotonic()
    proxy.stop()
    caller.join(timeout=10)
    assert time.monotonic() - start < 5 and not caller.is_alive()
    assert errors  # the client saw the connection close
