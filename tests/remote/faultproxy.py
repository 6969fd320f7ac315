"""A fault-injecting HTTP/1.1 TCP proxy on loopback, for tests against local object stores.

``FaultProxy(upstream_port)`` listens on ``127.0.0.1:<port>`` and forwards bytes to the
server. It parses just enough HTTP to find request boundaries (the head, then a
``Content-Length`` or chunked body), so a fault hits the next *request* even on a kept-alive
pooled connection, and a fault can be aimed at some requests only with ``match`` (a substring
of the request line, e.g. ``"PUT "`` or ``"uploadId="``). Requests that do not match pass
through and consume nothing.

Fault kinds (``inject(kind, count, ...)``), each used for the next ``count`` matching requests:

- ``"reset"``: close the client connection with RST (``SO_LINGER`` 0) right after reading the
  request head; the client sees ``ECONNRESET`` / "connection reset by peer".
- ``"http_error"``: answer ``status`` (503 by default) with ``Connection: close`` and
  ``body`` (default: the proxy's ``error_body``, e.g. ``S3_SLOWDOWN``), without forwarding.
- ``"stall"``: read the request, answer nothing for ``seconds``, then close: a read time-out.
- ``"delay"``: wait ``seconds``, then forward normally (a slow server).
- ``"truncate"``: forward the request, pass ``after_bytes`` of the response through and then
  reset the connection: a response cut short mid-body (a shorter response is not cut).

Everything is thread-based and bounded: at most ``max_connections`` live connections (others
are reset at once), stalls wake up on ``stop()``, and ``stop()`` shuts every socket down.
"""

from __future__ import annotations

import contextlib
import http
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["reset", "http_error", "stall", "delay", "truncate"]

S3_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)
GCS_UNAVAILABLE = b'{"error": {"code": 503, "message": "Service Unavailable (injected)"}}'

_MAX_HEAD = 64 * 1024


@dataclass
class _Rule:
    kind: FaultKind
    remaining: int
    match: str | None
    seconds: float
    status: int
    body: bytes | None
    after_bytes: int


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    cut_after: int | None = None  # set by the request side, read by the response pump
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Reader:
    """Buffered reads from a socket: a request head, exact byte counts, CRLF lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def head(self) -> bytes | None:
        """The bytes up to and including the blank line, or None at a clean EOF."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ConnectionError("request head too large")
            if not self._fill():
                if self.buf:
                    raise ConnectionError("EOF inside a request head")
                return None
        out, self.buf = self.buf[: end + 4], self.buf[end + 4 :]
        return out

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if not self._fill():
                raise ConnectionError("EOF inside a chunked body")
        out, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
        return out

    def chunks(self, n: int) -> Iterator[bytes]:
        """Exactly ``n`` bytes, as they arrive."""
        while n > 0:
            if not self.buf and not self._fill():
                raise ConnectionError("EOF inside a request body")
            out, self.buf = self.buf[:n], self.buf[n:]
            n -= len(out)
            yield out


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in head.split(b"\r\n")[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _body(reader: _Reader, headers: dict[str, str]) -> Iterator[bytes]:
    """The request body's raw bytes (framing included), as they arrive."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = reader.line()
            yield size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:  # trailers, then a blank line
                while (trailer := reader.line()) != b"\r\n":
                    yield trailer
                yield b"\r\n"
                return
            yield from reader.chunks(size + 2)
    else:
        yield from reader.chunks(int(headers.get("content-length", "0") or 0))


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream_host:upstream_port``, injecting faults on demand."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        port: int = 0,
        error_body: bytes = b"",
        error_content_type: str = "text/plain",
        max_connections: int = 128,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.error_body = error_body
        self.error_content_type = error_content_type
        self.max_connections = max_connections
        self.requests: deque[str] = deque(maxlen=10_000)  # request lines seen, in order
        self.injected: deque[tuple[FaultKind, str]] = deque(maxlen=10_000)
        self._rules: list[_Rule] = []
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ---------------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        match: str | None = None,
        seconds: float = 5.0,
        status: int = 503,
        body: bytes | None = None,
        after_bytes: int = 0,
    ) -> None:
        """Apply ``kind`` to the next ``count`` requests whose request line contains ``match``.

        ``seconds`` is for ``stall``/``delay``, ``status`` and ``body`` for ``http_error`` (body
        defaults to the proxy's ``error_body``), ``after_bytes`` for ``truncate``.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        with self._lock:
            self._rules.append(_Rule(kind, count, match, seconds, status, body, after_bytes))

    def clear(self) -> None:
        """Forget every fault not yet used."""
        with self._lock:
            self._rules.clear()

    @property
    def pending(self) -> int:
        """How many injections are still armed."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    def drop_connections(self) -> None:
        """Close every live connection (clients must reconnect)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn.client)
            _shutdown(conn.upstream)

    def start(self) -> FaultProxy:
        t = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, and wait (bounded) for the threads."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        _shutdown(self._listener)  # wakes accept() at once on Linux
        with self._lock:
            threads = list(self._threads)
        if threads:
            threads[0].join(timeout=timeout)  # the accept loop: no new connections after this
        self.drop_connections()
        for t in threads[1:]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- machinery -------------------------------------------------------------------------

    def _take(self, request_line: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.match is None or rule.match in request_line:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                    self.injected.append((rule.kind, request_line))
                    return rule
        return None

    def _spawn(self, target: Callable[[_Conn], None], conn: _Conn) -> None:
        t = threading.Thread(target=target, args=(conn,), daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                _reset(client)
            else:
                self._spawn(self._serve, conn)

    def _serve(self, conn: _Conn) -> None:
        reader = _Reader(conn.client)
        try:
            while not self._stop.is_set():
                head = reader.head()
                if head is None:
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                self.requests.append(request_line)
                headers = _headers(head)
                rule = self._take(request_line)
                if rule is not None and rule.kind not in ("delay", "truncate"):
                    self._fail(conn, reader, rule, head)
                    return
                if rule is not None and rule.kind == "delay" and self._stop.wait(rule.seconds):
                    return
                if conn.upstream is None:
                    if self._stop.is_set():
                        return
                    conn.upstream = socket.create_connection(self.upstream, timeout=10)
                    conn.upstream.settimeout(None)
                    conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._spawn(self._pump, conn)
                cut = rule.after_bytes if rule is not None and rule.kind == "truncate" else None
                with conn.lock:  # the previous response is complete: clients do not pipeline
                    conn.cut_after = cut
                conn.upstream.sendall(head)
                for piece in _body(reader, headers):
                    conn.upstream.sendall(piece)
        except (OSError, ValueError):
            pass
        finally:
            self._close(conn)

    def _fail(self, conn: _Conn, reader: _Reader, rule: _Rule, head: bytes) -> None:
        if rule.kind == "reset":
            _reset(conn.client)
            return
        if rule.kind == "stall":
            self._stop.wait(rule.seconds)
            return
        # http_error: read the body first (unless the client waits for "100 Continue"), so that
        # closing does not turn into an RST that would hide the response from the client.
        headers = _headers(head)
        if "100-continue" not in headers.get("expect", "").lower():
            for _ in _body(reader, headers):
                pass
        body = self.error_body if rule.body is None else rule.body
        reason = http.HTTPStatus(rule.status).phrase
        response = (
            f"HTTP/1.1 {rule.status} {reason}\r\n"
            f"Content-Type: {self.error_content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        if not head.startswith(b"HEAD "):  # a response to HEAD has no body
            response += body
        conn.client.sendall(response)
        with contextlib.suppress(OSError):
            conn.client.shutdown(socket.SHUT_WR)
            conn.client.settimeout(1.0)
            while conn.client.recv(65536):  # let the client close first
                pass

    def _pump(self, conn: _Conn) -> None:
        """Upstream to client, cutting the response short when a ``truncate`` fault asks."""
        assert conn.upstream is not None
        truncated = False
        try:
            while data := conn.upstream.recv(65536):
                with conn.lock:
                    cut = conn.cut_after
                    if cut is not None:
                        data = data[:cut]
                        conn.cut_after = cut - len(data)
                        truncated = conn.cut_after == 0
                if data:
                    conn.client.sendall(data)
                if truncated:
                    break
        except OSError:
            pass
        finally:
            # Wake the request side, which closes both sockets; after a truncation, with an RST.
            with contextlib.suppress(OSError):
                if truncated:
                    conn.client.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                conn.client.shutdown(socket.SHUT_RD if truncated else socket.SHUT_RDWR)

    def _close(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        _shutdown(conn.upstream)
        for sock in (conn.client, conn.upstream):
            if sock is not None:
                sock.close()
