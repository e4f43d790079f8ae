"""The contract's SSE framing and error replies: the one place that knows the wire format."""

import asyncio
import json

from raylm import errors
from raylm import contract


async def _collect(items, rid="r1"):
    async def gen():
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item

    return [frame async for frame in contract.sse_frames(gen(), rid)]


def test_stream_ends_with_done():
    frames = asyncio.run(_collect(['{"a": 1}', '{"b": 2}']))
    assert frames == ['data: {"a": 1}\n\n', 'data: {"b": 2}\n\n', "data: [DONE]\n\n"]


def test_stream_error_is_one_event_then_the_end():
    err = errors.InvalidRequestError("bad", param="x")
    frames = asyncio.run(_collect(['{"a": 1}', err, '{"never": 1}']))
    assert len(frames) == 2
    assert json.loads(frames[1][6:])["error"]["param"] == "x"


def test_crash_mid_stream_hides_internals():
    frames = asyncio.run(_collect(['{"a": 1}', RuntimeError("secret stack detail")]))
    assert "[DONE]" not in frames[-1]
    error = json.loads(frames[-1][6:])["error"]
    assert "secret" not in error["message"] and "r1" in error["message"]
    assert error["type"] == "server_error"


def test_error_reply_keeps_client_errors_and_hides_server_errors():
    client = contract.Reply.of(errors.NotFoundError("no such model", param="model"), "r2")
    assert client.status == 404 and json.loads(client.body)["error"]["param"] == "model"
    server = contract.Reply.of(errors.InternalError("engine core died at 0xdead"), "r3")
    assert server.status == 500 and "0xdead" not in server.body.decode()
    overloaded = contract.Reply.of(errors.OverloadedError("busy", retry_after=1), "r4")
    assert overloaded.headers == {"Retry-After": "1", "retry-after-ms": "1000"}
