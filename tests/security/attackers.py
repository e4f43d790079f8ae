"""Hostile clients, each run in a process of its own (so that its work never slows the test's own measuring
client), sending only to 127.0.0.1. Every loop is bounded in bytes, count and time. Their source addresses
are other loopback addresses (127.0.0.2, ...): to the server they are other clients than the test's."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable
from typing import Any


def idle_sockets(port: int, count: int, source: str, limit_s: float) -> dict[str, Any]:
    """Open `count` connections that send nothing; report how many the server took (not refused at once)
    and how long each took to close."""
    socks, refused = [], 0
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append((s, time.monotonic()))
    opened = time.monotonic()
    held, closed_after = 0, []
    for s, _ in socks:
        s.setblocking(False)
    pending = list(socks)
    while pending and time.monotonic() - opened < limit_s:
        still = []
        for s, at in pending:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                still.append((s, at))
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
            else:
                held += 1
                closed_after.append(time.monotonic() - at)
            s.close()
        pending = still
        time.sleep(0.05)
    for s, _ in pending:
        s.close()
    return {"refused": refused, "held": held, "still_open": len(pending),
            "longest_open_s": max(closed_after, default=0.0)}


def endless_header(port: int, source: str, total_bytes: int, limit_s: float) -> dict[str, Any]:
    """Stream one header of `total_bytes` (as fast as the server takes it) until the server cuts it."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(limit_s)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nx-endless: ")
    sent, start, chunk = 0, time.monotonic(), b"a" * 65536
    try:
        while sent < total_bytes and time.monotonic() - start < limit_s:
            sent += s.send(chunk)
    except OSError:
        pass
    cut_after = time.monotonic() - start
    s.close()
    return {"sent": sent, "cut_after_s": cut_after}


def chunked_upload(port: int, headers: dict[str, str], total_bytes: int, limit_s: float) -> dict[str, Any]:
    """A multipart upload sent chunked (no Content-Length) of `total_bytes`, until the server answers or cuts
    it; reports what was sent and the status the server gave."""
    boundary = "raylm-attack"
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    s.settimeout(limit_s)
    head = [f"POST /v1/files HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked",
            f"Content-Type: multipart/form-data; boundary={boundary}", *(f"{k}: {v}" for k, v in headers.items())]
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    s.sendall(chunk(f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
                    .encode()))
    sent, start, data = 0, time.monotonic(), chunk(b'{"custom_id": "x"}\n' * 52429)  # ~1 MiB a chunk
    s.setblocking(False)
    answer = b""
    try:
        while sent < total_bytes and time.monotonic() - start < limit_s:
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(data)
            except BlockingIOError:
                time.sleep(0.001)
    except OSError:
        pass
    s.settimeout(5)
    try:
        while b"\r\n\r\n" not in answer:
            more = s.recv(65536)
            if not more:
                break
            answer += more
    except OSError:
        pass
    s.close()
    status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else None
    return {"sent": sent, "status": status, "took_s": time.monotonic() - start}


def stalled_stream(port: int, headers: dict[str, str], body: bytes, hold_s: float) -> dict[str, Any]:
    """Send one streaming request with a tiny receive buffer and read nothing for `hold_s`."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    head = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    time.sleep(hold_s)
    s.close()
    return {}


class Running:
    """An attacker in its own process: `start`, then `result()` (bounded wait)."""

    def __init__(self, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        self._process = ctx.Process(target=_run, args=(self._queue, fn, args), daemon=True)

    def start(self) -> Running:
        self._process.start()
        return self

    def alive(self) -> bool:
        return self._process.is_alive()

    def result(self, timeout_s: float = 120) -> dict[str, Any]:
        try:
            out = self._queue.get(timeout=timeout_s)
        finally:
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
        if isinstance(out, BaseException):
            raise out
        return out


def _run(queue: Any, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the test, which raises it
        queue.put(exc)
