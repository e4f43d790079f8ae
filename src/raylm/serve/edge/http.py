"""HTTP at the edge: request ids, JSON bodies, responses in the one error shape, and the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from raylm import errors
from raylm.contract import Reply

logger = logging.getLogger("raylm.serve")

REQUEST_ID_HEADER = "x-request-id"


def request_id(request: Request) -> str:
    """The client's x-request-id, else a new one; either goes back in the response's header."""
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


async def json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 past it) and parsed (400 if it is not one)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.RequestTooLargeError(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.RequestTooLargeError(limit)
        chunks.append(chunk)
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


def json_response(reply: Reply, rid: str) -> Response:
    return Response(reply.body, status_code=reply.status, media_type="application/json",
                    headers={**reply.headers, REQUEST_ID_HEADER: rid})


def sse_response(chunks: AsyncIterator[bytes], rid: str) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={REQUEST_ID_HEADER: rid})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # a replica's signals belong to Ray


async def serve_http(app: ASGIApp, host: str, port: int, keep_alive_s: float = 30.0) -> uvicorn.Server:
    """Serve `app` on host:port from this process's event loop. SO_REUSEPORT lets a replacement replica
    (or a second ingress replica on the node) bind the port while another holds it; the kernel spreads
    new connections between them. Raises OSError when the port is taken by anything else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = _Server(uvicorn.Config(app, lifespan="off", access_log=False, log_config=None, http="httptools",
                                    ws="none", timeout_keep_alive=int(keep_alive_s)))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    server.task = task  # kept alive with the server
    return server
