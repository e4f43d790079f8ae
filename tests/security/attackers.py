"""Hostile clients, each run in a process of its own at the lowest priority (SCHED_IDLE: on 2 cores a client's
own CPU would otherwise be measured as the server's, and its GIL would slow the test's measuring client),
sending only to 127.0.0.1. Every loop is bounded in bytes, count and time. Their source addresses are other
loopback addresses (127.0.0.2, ...): to the server they are other clients than the test's."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from typing import Any


def idle_sockets(port: int, count: int, source: str, hold_s: float, start_at: float = 0.0,
                 per_s: float = 1000.0) -> dict[str, Any]:
    """Open `count` connections (`per_s` a second) that send nothing, and hold them `hold_s` after the last;
    then count the 503s the server answered at once (what it did with the rest, the test sees server-side:
    this process runs at the lowest priority and may be late to notice anything)."""
    _wait_until(start_at)
    socks, failed, began = [], 0, time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, began + i / per_s - time.monotonic()))
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    connected_at = time.monotonic()
    time.sleep(max(0.0, connected_at + hold_s - time.monotonic()))
    refused = 0
    for s in socks:
        s.setblocking(False)
        try:
            refused += s.recv(64).startswith(b"HTTP/1.1 503")
        except OSError:
            pass
        s.close()
    return {"connected_at": connected_at, "refused_503": refused, "connect_failed": failed}


def _wait_until(start_at: float) -> None:
    """Attackers start at a set moment (CLOCK_MONOTONIC is the machine's): their interpreter's start-up is
    over by then, so only the attack itself overlaps what the test measures."""
    time.sleep(max(0.0, start_at - time.monotonic()))


def endless_header(port: int, source: str, total_bytes: int, limit_s: float, start_at: float = 0.0) -> dict[str, Any]:
    """Stream one header of `total_bytes` (as fast as the server takes it) until the server cuts it."""
    _wait_until(start_at)
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
    head = ["POST /v1/files HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked",
            f"Content-Type: multipart/form-data; boundary={boundary}", *(f"{k}: {v}" for k, v in headers.items())]
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    s.sendall(chunk(f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
                    .encode()))
    sent, start, data = 0, time.monotonic(), chunk(b'{"custom_id": "x"}\n' * 52429)  # ~1 MiB a chunk
    s.setblocking(False)
    answer, left = b"", memoryview(data)
    try:
        while sent < total_bytes and time.monotonic() - start < limit_s:
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                n = s.send(left)  # a send may take part of a chunk: the rest goes next, or the framing breaks
            except BlockingIOError:
                time.sleep(0.001)
                continue
            sent, left = sent + n, left[n:]
            if not left:
                left = memoryview(data)
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


def stalled_stream(port: int, headers: dict[str, str], body: bytes, hold_s: float,
                   start_at: float = 0.0) -> dict[str, Any]:
    """At `start_at`, send one streaming request with a tiny receive buffer and read nothing for `hold_s`."""
    _wait_until(start_at)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
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

    def stop(self) -> None:
        """End it now (its sockets close with it)."""
        self._process.kill()
        self._process.join(5)

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


def big_file(port: int, headers: dict[str, str], line_bytes: int, lines: int, limit_s: float,
             start_at: float = 0.0) -> dict[str, Any]:
    """Upload a batch file of `lines` lines of `line_bytes`, download it back, delete it."""
    import httpx

    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "%s"}}\n' % (
        b"a" * (line_bytes - 100))
    payload = line * lines
    _wait_until(start_at)
    start = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=limit_s) as http:
        r = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", payload)})
        if r.status_code != 200:
            return {"status": r.status_code, "body": r.text[:300]}
        file_id, size = r.json()["id"], 0
        uploaded = time.monotonic()
        with http.stream("GET", f"/v1/files/{file_id}/content") as got:
            for chunk in got.iter_bytes():
                size += len(chunk)
        http.delete(f"/v1/files/{file_id}")
    return {"status": 200, "uploaded": len(payload), "downloaded": size, "upload_s": uploaded - start,
            "download_s": time.monotonic() - uploaded, "start": start, "end": time.monotonic()}


def _run(queue: Any, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:  # runs only when nothing else wants a core (Ray's workers, the engine among them, run at nice 15)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    try:
        queue.put(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the test, which raises it
        queue.put(exc)
