"""Which storage failures are worth retrying, and the retry policy for them.

Transient: connection resets and refusals, timeouts, HTTP 5xx and throttling (429, S3's
SlowDown). Permanent: no such bucket or key, access denied, bad requests; they fail at
once. The clients disagree on types: botocore's connection errors are not `OSError`,
aiohttp has its own hierarchy, and gcsfs raises `HttpError` with a status code, so the
predicate looks at class names and status codes rather than importing every client.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")

_TRANSIENT_NAMES = {
    "ConnectionError",  # builtins and requests
    "ConnectionResetError",
    "ConnectionAbortedError",
    "ConnectionRefusedError",
    "BrokenPipeError",
    "TimeoutError",
    "EndpointConnectionError",  # botocore
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ClientConnectionError",  # aiohttp
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "TransientError",  # gcsfs
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "TooManyRequests",
    "429",
    "408",
}
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSPC}


def is_transient(exc: BaseException) -> bool:
    """True for failures that a retry may fix (checks the exception and its causes)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_here(current):
            return True
        if _permanent_here(current):
            return False
        current = current.__cause__ or current.__context__
    return False


def _permanent_here(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError | PermissionError | FileExistsError) or (
        isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS
    )


def _transient_here(exc: BaseException) -> bool:
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    status = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(status, int) and (status >= 500 or status in (408, 429)):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        error = response.get("Error", {})
        meta = response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", 0)
        if error.get("Code") in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return True
    text = str(exc)
    return any(code in text for code in ("SlowDown", "503 Service", "500 Internal"))


def retrying(max_secs: float) -> Callable[[Callable[[], T]], T]:
    """``retrying(60)(fn)`` calls ``fn`` until it succeeds, a permanent error, or 60 s.

    Exponential backoff with full jitter (0.1 s up to 10 s between attempts).
    """

    def call(fn: Callable[[], T]) -> T:
        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=10),
            stop=tenacity.stop_after_delay(max_secs),
            reraise=True,
        )
        return retryer(fn)

    return call
