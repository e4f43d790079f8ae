"""HTTP at the edge: request ids, JSON bodies, responses in the one error shape, and the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping

import uvicorn
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from raylm import errors
from raylm.config import HTTPConfig
from raylm.contract import Reply
from raylm.serve.edge.limits import protocol_class

logger = logging.getLogger("raylm.serve")

REQUEST_ID_HEADER = "x-request-id"


def request_id(request: Request) -> str:
    """The client's x-request-id, else a new one; either goes back in the response's header."""
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


async def body_chunks(request: Request, limit: int, idle_s: float) -> AsyncIterator[bytes]:
    """The body as it arrives, refused past `limit` bytes (413: a declared length at once, a chunked body as
    soon as it passes) or when no byte comes for `idle_s` (408)."""
    check_declared_length(request, limit)
    size, chunks = 0, request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise errors.RequestTimeoutError(f"the request body sent nothing for {idle_s:g}s "
                                             "(serve.http.body_timeout_s)") from None
        size += len(chunk)
        if size > limit:
            raise errors.RequestTooLargeError(limit)
        yield chunk


def check_declared_length(request: Request, limit: int) -> None:
    """413 for a body declared longer than `limit`, before a byte of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.RequestTooLargeError(limit)


def require_json(request: Request) -> None:
    """JSON routes take `Content-Type: application/json` only, as vLLM's do: a web page can send any other
    type to 127.0.0.1 without a CORS preflight (text/plain, a form), never this one."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise errors.UnsupportedMediaTypeError(
            f"Unsupported Media Type: only 'application/json' is allowed, not {media_type or 'none'!r}")


async def json_body(request: Request, limit: int, idle_s: float) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 past it) and parsed (400 if it is not one)."""
    check_declared_length(request, limit)
    require_json(request)
    chunks = [chunk async for chunk in body_chunks(request, limit, idle_s)]
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidRequestError(f"the request body is not valid JSON: {exc}",
                                         code="invalid_json") from None
    except RecursionError:
        raise errors.InvalidRequestError("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    return body


def error_response(exc: Exception, rid: str) -> Response:
    return json_response(Reply.of(exc, rid), rid)


def json_response(reply: Reply, rid: str, headers: Mapping[str, str] | None = None) -> Response:
    """`headers`: the ingress's own (x-ratelimit-*, traceparent) beside the reply's."""
    return Response(reply.body, status_code=reply.status, media_type="application/json",
                    headers={**(headers or {}), **reply.headers, REQUEST_ID_HEADER: rid})


def sse_response(chunks: AsyncIterator[bytes], rid: str,
                 headers: Mapping[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={**(headers or {}), REQUEST_ID_HEADER: rid})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # a replica's signals belong to Ray


async def serve_http(app: ASGIApp, host: str, port: int, limits: HTTPConfig) -> uvicorn.Server:
    """Serve `app` on host:port from this process's event loop, within `limits` (limits.py). SO_REUSEPORT
    lets a replacement replica (or a second ingress replica on the node) bind the port while another holds
    it; the kernel spreads new connections between them. Raises OSError when the port is taken by anything
    else."""
    _allow_open_files(limits.max_connections + 1024)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = _Server(uvicorn.Config(app, lifespan="off", access_log=False, log_config=None,
                                    http=protocol_class(limits), ws="none",
                                    timeout_keep_alive=max(1, round(limits.keep_alive_s))))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    server.task = task  # kept alive with the server
    return server


def _allow_open_files(wanted: int) -> None:
    """Each connection is a file descriptor: raise this process's soft limit toward `wanted` (never past the
    hard limit), so the connection caps, not EMFILE, decide who is refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
