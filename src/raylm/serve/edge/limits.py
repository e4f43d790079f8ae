"""The edge's limits: what one connection may send, and hold, before any of raylm's code runs.

    accept ─► over max_connections, or max_connections_per_client for its address?  503, closed
           ─► request head (line + headers) within header_timeout_s of connecting (or of its first byte
              on a kept-alive connection)?                                          else 408, closed
              request line ≤ max_request_line_bytes?                                else 414, closed
              head ≤ max_header_bytes, ≤ max_header_count headers?                  else 431, closed
           ─► the app (auth, routes)
    answer ─► a client that takes none of it for write_timeout_s (the socket's buffer, send_buffer_bytes,
              full, and asyncio's too) is cut off: the relay sees a disconnect and closes the replica's
              stream, which aborts the engine request and frees its slot
    idle   ─► kept alive keep_alive_s (uvicorn's own timeout), then closed

uvicorn with httptools parses HTTP here; httptools (llhttp) has no limit on a header's size or count and
uvicorn no timeout for a head that never ends, a cap per client, or a write deadline: this protocol class
adds them (h11 has a size cap, `h11_max_incomplete_event_size`, which vLLM's launcher sets; uvicorn picks
httptools when it is installed, as it is here, and then no cap applies). A refused request never reaches the
app: its answer is written here, in the one error shape, and the connection closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from raylm import errors
from raylm.config import HTTPConfig

logger = logging.getLogger("raylm.serve")


@dataclass
class ConnectionTable:
    """Open connections, in all and per client address, against serve.http's caps."""

    limits: HTTPConfig
    by_client: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def admit(self, client: str) -> bool:
        if self.total >= self.limits.max_connections or \
                self.by_client[client] >= self.limits.max_connections_per_client:
            return False
        self.total += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that is refused."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `limits` and `table` are set by `protocol_class`."""

    limits: HTTPConfig
    table: ConnectionTable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: str | None = None  # the address counted in the table
        self._refused: errors.APIError | None = None
        self._in_head = False  # a request's head has begun and is not complete
        self._head_bytes = 0  # whole reads of a head in progress
        self._parsed_bytes = 0  # its line and headers as parsed
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._draining = False  # the server is shutting down gracefully (the ingress replica leaving)

    # connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else ""
        if not self.table.admit(client):  # refused before uvicorn sets anything up: a flood costs little
            self.transport, self._refused = transport, _TOO_MANY
            transport.write(_TOO_MANY_ANSWER)
            transport.close()
            return
        super().connection_made(transport)
        self._client = client
        sock = transport.get_extra_info("socket")
        if sock is not None:  # bounded, so a reader that stalls fills it (and the write deadline starts) soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        self._arm_head_timer()  # a connection that sends nothing is closed like a slow head

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is None:  # refused in connection_made: uvicorn never knew it
            return
        self.table.release(self._client)
        self._client = None
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        head_before = self._in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # no WebSocket routes here
            self._refuse(errors.InvalidRequestError("protocol upgrades are not served", code="invalid_http"))
            return
        except httptools.HttpParserError:
            self._refuse(self._refused or errors.InvalidRequestError("invalid HTTP request", code="invalid_http"))
            return
        if self._in_head:
            # A head still unfinished after this read: its whole reads count (one that began mid-read counts
            # from the next), so a header that never ends is cut within a read (≤ 256 KiB) of the limit. A
            # finished head is measured as parsed (on_header).
            self._head_bytes += len(data) if head_before else 0
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._head_too_large())

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count, self._parsed_bytes = True, 0, 0, 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        if len(self.url) + len(url) > self.limits.max_request_line_bytes:
            err = errors.HeadersTooLargeError(
                f"the request line is longer than {self.limits.max_request_line_bytes:,} bytes "
                "(serve.http.max_request_line_bytes)", code="request_line_too_long")
            err.status = 414
            self._refused = err
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_header_count:
            self._refused = errors.HeadersTooLargeError(
                f"the request has more than {self.limits.max_header_count} headers "
                "(serve.http.max_header_count)", code="too_many_headers")
            raise _Refused
        if self._parsed_bytes > self.limits.max_header_bytes:  # a whole head that came in one read
            self._refused = self._head_too_large()
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused is not None:
            return
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown (the ingress replica leaving): a connection idle between requests is
        closed, as uvicorn does; one whose first request is still on its way (accepted, or its head begun) is
        answered, then closed. uvicorn closed those too: their clients got no answer at all (6 of 1,103 in a
        rolling update under load, tests/chaos/test_rolling.py)."""
        self._draining = True
        if self.cycle is None or self._in_head:
            return  # its head timer bounds the wait for a request that never comes
        super().shutdown()

    # writing
    def pause_writing(self) -> None:
        """The client stopped taking its answer (the transport's buffer is over its high-water mark)."""
        if self.flow is None:  # a connection refused before uvicorn set it up
            return
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        if self.flow is None:
            return
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        logger.info("a client took none of its answer for %.0fs: connection cut, its request aborted",
                    self.limits.write_timeout_s)
        self.transport.abort()  # connection_lost → the app sees a disconnect (Starlette cancels the stream)

    # refusing
    def _head_too_large(self) -> errors.APIError:
        return errors.HeadersTooLargeError(f"the request head is larger than {self.limits.max_header_bytes:,} "
                                           "bytes (serve.http.max_header_bytes)")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head or self.cycle is None:  # a head in progress, or nothing sent since connecting
            self._refuse(errors.RequestTimeoutError(
                f"the request head did not arrive within {self.limits.header_timeout_s:g}s "
                "(serve.http.header_timeout_s)"))

    def _refuse(self, err: errors.APIError) -> None:
        """Answer `err` in the one error shape and close: the app never sees this request."""
        self._refused = err
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.transport.is_closing():
            return
        self.transport.write(_answer(err))
        self.transport.close()


_TOO_MANY = errors.UnavailableError("too many open connections; retry later", code="too_many_connections",
                                    retry_after=1)


def _answer(err: errors.APIError) -> bytes:
    """A whole HTTP answer, `connection: close`, in the one error shape."""
    body = json.dumps(err.body()).encode()
    head = [STATUS_LINE[err.status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    head += [f"{k}: {v}\r\n".encode() for k, v in err.headers().items()]
    return b"".join([*head, b"\r\n", body])


_TOO_MANY_ANSWER = _answer(_TOO_MANY)  # made once: a flood of connections is answered with these bytes


def protocol_class(limits: HTTPConfig) -> type[GuardedProtocol]:
    """The protocol class for one server: its limits and its own connection table."""
    return type("RaylmHTTPProtocol", (GuardedProtocol,), {"limits": limits, "table": ConnectionTable(limits)})
