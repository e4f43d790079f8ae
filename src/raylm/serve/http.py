"""HTTP helpers: request ids, JSON bodies, the one error shape, and SSE framing (only here)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from raylm import errors

logger = logging.getLogger("raylm.serve")

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class Reply:
    """The head of a model server's answer: a full JSON body, or `body=None` for a stream to follow."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamError:
    """Ends a stream that has started: the HTTP layer sends it as one SSE error event."""

    body: dict


def request_id(request: Request) -> str:
    """The client's x-request-id, else Serve's id for this request (Serve echoes it in the response)."""
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid:
        return rid
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # outside a Serve replica (in-process tests)
        return uuid.uuid4().hex


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidRequestError(f"the request body is not valid JSON: {exc}",
                                         code="invalid_json") from None
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
    return Reply(err.status, json.dumps(err.body()).encode(), err.headers())


def json_response(reply: Reply) -> Response:
    # Serve's proxy puts x-request-id on every response; adding ours would duplicate it.
    return Response(reply.body, status_code=reply.status, media_type="application/json",
                    headers=reply.headers)


def sse_response(items: AsyncIterator[str | StreamError], rid: str) -> StreamingResponse:
    return StreamingResponse(sse_frames(items, rid), media_type="text/event-stream")


async def sse_frames(items: AsyncIterator[str | StreamError], rid: str) -> AsyncIterator[str]:
    """Chunk payloads as SSE events, then `[DONE]`; an error becomes one error event and ends the stream."""
    try:
        async for item in items:
            if isinstance(item, StreamError):
                yield f"data: {json.dumps(item.body)}\n\n"
                return
            yield f"data: {item}\n\n"
    except Exception as exc:  # e.g. the replica behind a handle died mid-stream
        yield f"data: {json.dumps(api_error(exc, rid).body())}\n\n"
        return
    yield "data: [DONE]\n\n"
