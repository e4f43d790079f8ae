"""The HTTP edge's limits on real sockets: uvicorn with raylm's protocol in this process, raw TCP clients."""

import asyncio
import json
import socket

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from raylm.config import HTTPConfig
from raylm.serve.edge import http

LIMITS = HTTPConfig(max_request_line_bytes=1024, max_header_bytes=4096, max_header_count=16, header_timeout_s=0.5,
                    keep_alive_s=5, write_timeout_s=0.5, max_connections=64, max_connections_per_client=4)


def _app(events: list) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/flood")
    async def flood(request: Request) -> StreamingResponse:
        async def chunks():
            try:
                for _ in range(100_000):  # ~1.6 GB, far more than any buffer
                    await asyncio.sleep(0)  # as a relay waits on its replica's socket
                    yield b"x" * 16384
                events.append("finished")
            finally:
                events.append("closed")
        return StreamingResponse(chunks())

    return app


async def _served(events: list):
    port = _free_port()
    server = await http.serve_http(_app(events), "127.0.0.1", port, LIMITS)
    return server, port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _open(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _answer(reader: asyncio.StreamReader, timeout_s: float = 5) -> tuple[int, dict]:
    raw = await asyncio.wait_for(reader.read(), timeout_s)  # to EOF: the server closes after refusing
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _run(scenario):
    async def main():
        events: list = []
        server, port = await _served(events)
        try:
            return await scenario(port, events)
        finally:
            server.should_exit = True
            await asyncio.wait({server.task}, timeout=5)
    return asyncio.run(main())


def test_a_normal_request_passes():
    async def scenario(port, _):
        reader, writer = await _open(port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    assert b'{"status":"ok"}' in _run(scenario)


@pytest.mark.parametrize("request_head,status,code", [
    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(20)) + b"\r\n", 431, "too_many_headers"),
    (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GARBAGE\r\n\r\n", 400, "invalid_http"),
])
def test_an_oversized_or_malformed_head_is_refused_before_the_app(request_head, status, code):
    async def scenario(port, _):
        reader, writer = await _open(port)
        writer.write(request_head)
        return await _answer(reader)
    got_status, body = _run(scenario)
    assert (got_status, body["error"]["code"]) == (status, code)


def test_an_endless_header_is_cut_within_a_read_of_the_limit():
    async def scenario(port, _):
        reader, writer = await _open(port)
        writer.write(b"GET / HTTP/1.1\r\nx-endless: ")
        sent = 0
        try:
            for _ in range(4096):  # up to 64 MiB, a chunk at a time
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
        except ConnectionError:
            pass
        try:
            return sent, (await _answer(reader))[0]
        except ConnectionResetError:  # the 431 was sent, but the unread bytes made the kernel reset
            return sent, None
    sent, status = _run(scenario)
    assert status in (431, None) and sent < 4 * 2**20  # cut long before the 64 MiB the client meant to send


@pytest.mark.parametrize("trickle", [False, True])
def test_a_silent_or_slow_head_is_closed_after_the_header_timeout(trickle):
    async def scenario(port, _):
        reader, writer = await _open(port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = asyncio.ensure_future(_answer(reader))
        if trickle:  # slowloris: a byte at a time, until the server closes
            for byte in b"GET / HTTP/1.1\r\nx-slow: " + b"a" * 200:
                if answer.done() or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
        status, body = await answer
        return status, body, loop.time() - start
    status, body, waited = _run(scenario)
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert waited < LIMITS.header_timeout_s + 2.0


def test_connections_are_capped_per_client_address_and_others_still_get_in():
    async def scenario(port, _):
        held = [await _open(port, "127.0.0.2") for _ in range(LIMITS.max_connections_per_client)]
        reader, _ = await _open(port, "127.0.0.2")
        refused = await _answer(reader)
        reader, writer = await _open(port, "127.0.0.1")
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        other = await asyncio.wait_for(reader.read(), 5)
        for _, w in held:
            w.close()
        return refused, other
    (status, body), other = _run(scenario)
    assert (status, body["error"]["code"]) == (503, "too_many_connections")
    assert b'{"status":"ok"}' in other


def test_a_client_that_stops_reading_is_cut_and_its_answer_stops_being_made():
    async def scenario(port, events):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        loop = asyncio.get_running_loop()
        start = loop.time()
        while "closed" not in events and loop.time() - start < 10:
            await asyncio.sleep(0.05)
        writer.close()
        return list(events), loop.time() - start
    events, waited = _run(scenario)
    assert events == ["closed"]  # aborted, not run to its end into buffers
    assert waited < LIMITS.write_timeout_s + 3.0


def test_a_server_shutting_down_answers_a_request_on_its_way_and_closes_an_idle_connection():
    async def run():
        server, port = await _served([])
        idle_reader, idle_writer = await _open(port)
        idle_writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await idle_writer.drain()
        await asyncio.wait_for(idle_reader.readuntil(b'{"status":"ok"}'), 5)  # answered, kept alive, now idle
        fresh_reader, fresh_writer = await _open(port)
        fresh_writer.write(b"GET /health HTTP/1.1\r\n")  # its head begun, not finished
        await fresh_writer.drain()
        await asyncio.sleep(0.05)
        server.should_exit = True  # as the ingress's __del__ does
        await asyncio.sleep(0.3)
        fresh_writer.write(b"Host: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(fresh_reader.read(), 5)  # to EOF: closed after its answer
        idle_closed = await asyncio.wait_for(idle_reader.read(), 5) == b""
        await asyncio.wait_for(server.task, 5)
        return answer, idle_closed
    answer, idle_closed = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
    assert idle_closed
