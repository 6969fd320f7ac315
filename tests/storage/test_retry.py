"""Which storage failures are retried (`storage.retry`): the predicate on the exception
types the clients raise, and the retry loop around it."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from checkpointing.storage.retry import is_transient, retrying


class EndpointConnectionError(Exception):  # botocore's, by name: not an OSError
    pass


class ClientError(Exception):  # botocore's shape: a response dict
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response: dict[str, Any] = {
            "Error": {"Code": code},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }


class HttpError(Exception):  # gcsfs's shape: a status code
    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(),
        TimeoutError(),
        EndpointConnectionError("refused"),
        ClientError("SlowDown", 503),
        ClientError("TooManyRequests", 429),
        ClientError("InternalError", 500),
        HttpError(502),
        HttpError(408),
        caused(OSError(errno.EBUSY, "busy"), ClientError("ServiceUnavailable", 503)),
    ],
    ids=repr,
)
def test_transient_failures_are_retried(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no such bucket"),
        PermissionError("denied"),
        FileExistsError("precondition"),
        OSError(errno.ENOSPC, "full"),
        ClientError("AccessDenied", 403),
        HttpError(404),
        ValueError("Bad Request"),
        caused(PermissionError("denied"), ConnectionResetError()),  # the outer one decides
    ],
    ids=repr,
)
def test_permanent_failures_are_not(error: BaseException) -> None:
    assert not is_transient(error)


def test_a_transient_failure_is_retried_until_it_passes() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError()
        return "done"

    assert retrying(30)(flaky) == "done" and len(calls) == 3


def test_a_permanent_failure_is_raised_at_once() -> None:
    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retrying(30)(missing)
    assert len(calls) == 1


def test_retries_stop_after_their_budget() -> None:
    def down() -> None:
        raise ConnectionRefusedError()

    with pytest.raises(ConnectionRefusedError):
        retrying(0.3)(down)
