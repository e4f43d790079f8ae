"""Streams from a model replica to the ingress over one direct TCP connection each, not through Ray.

    ingress ──Serve handle call──► model replica: admission, engine.create, yields Direct(host, port, ticket)
    ingress ──connect, ticket────► replica's StreamHub
    ingress ◄──SSE bytes as the engine makes them── replica          (then on to the client, as they are)

Serve still routes the request, counts it (autoscaling, max_ongoing_requests), retries it and cancels it:
the handle call stays open until the stream ends. Only the tokens leave Ray's path, where each was one Ray
message per hop (1.6 ms of CPU per token, BENCHMARKS.md). The engine starts at once; frames made before the
ingress connects wait in the replica.

A ticket is 128 random bits, valid once and for `CLAIM_TIMEOUT_S`; it travels only inside the handle call
(Ray's authenticated channel). The hub listens on the node's address (loopback on a cluster raylm starts)
and closes a connection that does not send a waiting ticket within `TICKET_TIMEOUT_S`, and any beyond
`MAX_CONNECTIONS`. A stream whose ingress goes away (end of its input) or never comes is cancelled, which
aborts the engine request; so is one the ingress takes nothing of for `STALL_S` (the ingress cuts a client
that stalls far sooner: serve.http.write_timeout_s ≤ 60 s). Each hop's socket buffers are `SOCKET_BUFFER`
bytes, so a stalled stream holds a bounded amount here and in the ingress, whatever its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator

from raylm.contract import Direct, LastEvent, StreamAborted

logger = logging.getLogger("raylm.serve")

TICKET_BYTES = 16
CLAIM_TIMEOUT_S = 30.0  # a stream nobody comes for is aborted
TICKET_TIMEOUT_S = 2.0  # the ingress sends its ticket at once: a silent connection is not it
MAX_CONNECTIONS = 4096  # open at once per hub (each an engine stream: far above any replica's batch)
STALL_S = 90.0  # the ingress took none of a stream for this long: abort it
# Each side's kernel buffer on the replica → ingress hop (the kernel doubles it): a stalled stream holds ~0.3 MB
# here, not the 10 MB autotuning allows; token streams need far less (loopback: GB/s; 0.5 ms RTT: 256 MB/s).
SOCKET_BUFFER = 64 * 1024
READ_BYTES = 65536
class Outgoing:
    """One stream at the replica: frames go out as the engine makes them, once its connection claims it."""

    def __init__(self, frames: AsyncIterator[str]) -> None:
        self._frames = frames
        self._writer: asyncio.StreamWriter | None = None
        self._early: list[bytes] = []
        self._claimed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def claim(self, writer: asyncio.StreamWriter) -> None:
        writer.writelines(self._early)
        self._early.clear()
        self._writer = writer
        self._claimed.set()

    def abort(self) -> None:
        """Stop the stream; cancelling the task reaches the engine's generator, which aborts the request."""
        if not self.task.done():
            self.task.cancel()

    def expire(self) -> None:
        if self._writer is None:
            logger.warning("a stream was not claimed within %.0fs: aborted", CLAIM_TIMEOUT_S)
            self.abort()

    async def _drained(self) -> None:
        """Wait while the ingress lags (bounded by STALL_S); nothing at all, per token, while it keeps up."""
        assert self._writer is not None
        if not self._writer.transport.get_write_buffer_size():
            return
        async with asyncio.timeout(STALL_S):  # not wait_for: on 3.11 it can swallow the abort's cancellation
            await self._writer.drain()

    async def _pump(self) -> None:
        try:
            async for frame in self._frames:
                data = frame.encode()
                if self._writer is None:
                    self._early.append(data)
                    continue
                self._writer.write(data)
                await self._drained()  # at once unless the reader lags (flow control)
            await self._claimed.wait()
            await self._drained()
        except ConnectionError as exc:  # the ingress went away mid-write
            logger.debug("stream connection lost: %r", exc)
        except StreamAborted as exc:  # a resumable stream's engine failed: cut, so the ingress resumes it
            logger.warning("engine failed mid-stream (%r): stream cut for its ingress to resume", exc.__cause__)
        except TimeoutError:
            logger.warning("the ingress took none of a stream for %.0fs: aborted", STALL_S)
        finally:
            with contextlib.suppress(Exception):
                await self._frames.aclose()  # an unfinished engine request is aborted here
            if self._writer is not None:
                self._writer.close()


class StreamHub:
    """The replica's end: a TCP listener on its node where each engine stream waits for its ingress."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, Outgoing] = {}
        self._server: asyncio.Server | None = None
        self.connections = 0
        self.host = ""
        self.port = 0
        self.replica = ""

    async def start(self, host: str, replica: str = "") -> None:
        self.replica = replica
        self._server = await asyncio.start_server(self._on_connect, host, 0)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    def open(self, frames: AsyncIterator[str]) -> tuple[Direct, Outgoing]:
        """Start streaming `frames` (SSE text) and return where the ingress collects them."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        out = Outgoing(frames)
        self._waiting[ticket] = out
        timer = asyncio.get_running_loop().call_later(CLAIM_TIMEOUT_S, out.expire)
        out.task.add_done_callback(lambda _: (timer.cancel(), self._waiting.pop(ticket, None)))
        return Direct(self.host, self.port, ticket, self.replica), out

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ticket = await asyncio.wait_for(reader.readexactly(TICKET_BYTES), TICKET_TIMEOUT_S)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        out = self._waiting.pop(ticket, None)
        if out is None:
            writer.close()
            return
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        out.claim(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read(1)  # the ingress sends nothing more: end of input means it went away
        out.abort()  # a no-op for a stream that has ended

    async def close(self) -> None:
        for out in list(self._waiting.values()):
            out.abort()
        if self._server is not None:
            self._server.close()


async def connect(direct: Direct, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Claim a stream; raises ConnectionError (or OSError) if its replica is gone."""
    family = socket.AF_INET6 if ":" in direct.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connecting: it sets the window
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (direct.host, direct.port)), timeout_s)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(direct.ticket)
    return reader, writer


class StreamCut(ConnectionError):
    """The stream's connection ended before its last event: its replica died."""


async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[bytes]:
    """A claimed stream's bytes as they arrive; raises StreamCut if it ends before its last event."""
    events = LastEvent()
    try:
        while True:
            try:
                chunk = await reader.read(READ_BYTES)
            except ConnectionError:
                chunk = b""
            if not chunk:
                break
            events.feed(chunk)
            yield chunk
        if not events.finished():
            raise StreamCut("the stream ended before its last event")
    finally:
        writer.close()
