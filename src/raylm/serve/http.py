"""HTTP helpers: request ids, JSON bodies, the one error shape, SSE framing (only here), and the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp

from raylm import errors

logger = logging.getLogger("raylm.serve")

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class Reply:
    """A whole answer from a model server (a stream comes as a stream.Direct instead)."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


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


def api_error(exc: Exception, rid: str) -> errors.APIError:
    """Any exception as an APIError; internals are logged with the request id and never shown."""
    if isinstance(exc, errors.APIError) and not isinstance(exc, errors.InternalError):
        return exc
    logger.error("request %s failed: %r", rid, exc, exc_info=exc)
    return errors.InternalError(f"internal error (request id {rid})")


def error_reply(exc: Exception, rid: str) -> Reply:
    err = api_error(exc, rid)
    return Reply(json.dumps(err.body()).encode(), err.status, err.headers())


def json_response(reply: Reply, rid: str) -> Response:
    return Response(reply.body, status_code=reply.status, media_type="application/json",
                    headers={**reply.headers, REQUEST_ID_HEADER: rid})


def sse_response(chunks: AsyncIterator[bytes], rid: str) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={REQUEST_ID_HEADER: rid})


def error_event(exc: Exception, rid: str) -> str:
    return f"data: {json.dumps(api_error(exc, rid).body())}\n\n"


async def sse_frames(payloads: AsyncIterator[str], rid: str, named: bool = False) -> AsyncIterator[str]:
    """Chunk payloads as SSE events, then `[DONE]`; an error becomes one error event and ends the stream.
    Named: each event is named by its payload's `type` and there is no `[DONE]` (the Responses and Anthropic
    Messages streams, whose SDKs read the names)."""
    async with contextlib.aclosing(payloads):  # closing this closes the engine's stream (an abort)
        try:
            async for payload in payloads:
                if named:
                    yield f"event: {json.loads(payload).get('type', 'message')}\ndata: {payload}\n\n"
                else:
                    yield f"data: {payload}\n\n"
        except Exception as exc:  # the engine failed mid-stream
            yield ("event: error\n" if named else "") + error_event(exc, rid)
            return
    if not named:
        yield "data: [DONE]\n\n"


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
