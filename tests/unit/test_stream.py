"""The direct stream between a model replica and the ingress, on real loopback sockets."""

import asyncio

import pytest

from raylm import contract
from raylm.serve import stream


async def _frames(texts, closed: list, delay: float = 0.0, made: asyncio.Event | None = None):
    """Chunk payloads as an engine yields them (`made` is set after the last); `closed` records that the
    stream was closed (an abort)."""
    try:
        for text in texts:
            await asyncio.sleep(delay)
            yield text
        if made is not None:
            made.set()
    finally:
        closed.append(True)


async def _hub():
    hub = stream.StreamHub()
    await hub.start("127.0.0.1")
    return hub


def test_a_stream_arrives_whole_and_ends_with_done():
    async def run():
        hub, closed, made = await _hub(), [], asyncio.Event()
        direct, out = hub.open(contract.sse_frames(_frames(['{"a": 1}', '{"b": 2}'], closed, made=made), "r1"))
        await asyncio.wait_for(made.wait(), 5)  # the engine ran before the ingress connects: frames wait
        received = b"".join([c async for c in stream.receive(*await stream.connect(direct, 5))])
        await asyncio.wait_for(out.task, 5)
        await hub.close()
        return received, closed

    received, closed = asyncio.run(run())
    assert received == b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    assert closed == [True]


def test_a_wrong_ticket_gets_nothing_and_the_stream_still_waits():
    async def run():
        hub, closed = await _hub(), []
        direct, out = hub.open(contract.sse_frames(_frames(['{"a": 1}'], closed), "r1"))
        forged = contract.Direct(direct.host, direct.port, b"x" * stream.TICKET_BYTES)
        reader, writer = await stream.connect(forged, 5)
        nothing = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        received = b"".join([c async for c in stream.receive(*await stream.connect(direct, 5))])
        await hub.close()
        return nothing, received

    nothing, received = asyncio.run(run())
    assert nothing == b""
    assert received.endswith(b"data: [DONE]\n\n")


def test_the_ingress_going_away_aborts_the_engine_stream():
    async def run():
        hub, closed = await _hub(), []
        direct, out = hub.open(contract.sse_frames(_frames(['{"t": 1}'] * 1000, closed, delay=0.01), "r1"))
        reader, writer = await stream.connect(direct, 5)
        await reader.read(100)
        writer.close()
        await asyncio.wait_for(asyncio.wait({out.task}), 1.0)
        await hub.close()
        return closed

    assert asyncio.run(run()) == [True]


def test_an_unclaimed_stream_expires(monkeypatch):
    monkeypatch.setattr(stream, "CLAIM_TIMEOUT_S", 0.2)

    async def run():
        hub, closed = await _hub(), []
        _, out = hub.open(contract.sse_frames(_frames(['{"t": 1}'] * 1000, closed, delay=0.01), "r1"))
        await asyncio.wait_for(asyncio.wait({out.task}), 2.0)
        await hub.close()
        return out.task.cancelled(), closed

    assert asyncio.run(run()) == (True, [True])


def test_a_stream_cut_before_its_last_event_raises():
    async def run():
        hub, closed = await _hub(), []
        direct, out = hub.open(contract.sse_frames(_frames(['{"t": 1}'] * 1000, closed, delay=0.01), "r1"))
        chunks = stream.receive(*await stream.connect(direct, 5))
        first = await chunks.__anext__()
        out.abort()  # as if the replica died mid-stream
        with pytest.raises(stream.StreamCut):
            async for _ in chunks:
                pass
        await hub.close()
        return first

    assert asyncio.run(run()).startswith(b'data: {"t": 1}')


@pytest.mark.parametrize(("tail", "done"), [
    (b'data: {"a": 1}\n\ndata: [DONE]\n\n', True),
    (b'data: {"a": 1}\n\ndata: {"error": {"message": "x"}}\n\n', True),
    (b'data: {"a": 1}\n\n', False),
    (b'data: {"a": 1}\n\ndata: [DO', False),
    (b"", False),
    # Named events (Responses, Anthropic Messages): the API's last event, however long, or an error event.
    (b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: {" + b"x" * 10_000 + b"}\n\n", True),
    (b'event: message_start\ndata: {}\n\nevent: message_stop\ndata: {"type": "message_stop"}\n\n', True),
    (b'event: message_start\ndata: {}\n\nevent: error\ndata: {"error": {"message": "x"}}\n\n', True),
    (b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\n", False),
])
def test_finished_tells_a_whole_stream_from_a_cut_one(tail, done):
    assert contract.finished(tail) is done
    for size in (1, 2, 3, 7, 64):  # however the bytes arrive
        events = contract.LastEvent()
        for start in range(0, len(tail), size):
            events.feed(tail[start:start + size])
        assert events.finished() is done, size
