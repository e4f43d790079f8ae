"""Mid-stream resume's pure parts (serve/resume.py): which streams can go on, the marks on the wire and what
the ingress keeps of them, the continuation's body and its chunks rewritten as the original's."""

import asyncio
import json

import pytest

from raylm import errors
from raylm.config import AdmissionConfig
from raylm.contract import Call, Resume, StreamAborted, Tenant, Usage, sse_frames
from raylm.serve import resume
from raylm.serve.replica.admission import Admission

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10,
        "temperature": 0, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"seed": 3, "top_p": 0.9, "cache_salt": "s", "logprobs": False, "tools": []}, None),
    ({"stream": False}, "not a chat or completions stream"),
    ({"logprobs": True}, "`logprobs` is not carried over a resume"),
    ({"stop": ["\n"]}, "`stop` is not carried over a resume"),
    ({"presence_penalty": 0.5}, "`presence_penalty` is not carried over a resume"),
    ({"n": 2}, "n > 1 or echo"),
    ({"response_format": {"type": "json_object"}}, "tools or structured output"),
    ({"max_tokens": "4"}, "`max_tokens` is not an integer"),
])
def test_which_chat_streams_can_be_resumed(change, reason):
    assert resume.why_not("chat", {**CHAT, **change}) == reason


def test_completions_resume_one_prompt_only_and_chat_not_through_a_reasoning_parser():
    one = {"model": "m", "stream": True}
    assert resume.why_not("completions", {**one, "prompt": "a"}) is None
    assert resume.why_not("completions", {**one, "prompt": [1, 2, 3]}) is None
    assert resume.why_not("completions", {**one, "prompt": [[1, 2]]}) is None
    assert resume.why_not("completions", {**one, "prompt": ["a", "b"]}) == "several prompts"
    assert resume.why_not("chat", CHAT, reasoning_parser="granite") == "a reasoning parser splits the answer"
    assert resume.why_not("responses", {**one, "input": "a"}) == "not a chat or completions stream"


class _Meter:  # what Marks reads of engine.protocol.Meter
    def __init__(self):
        self.ids, self.prompt_ids = [], [1, 2, 3]


def test_marks_credit_each_event_with_the_ids_its_text_came_from():
    meter = _Meter()
    marks = resume.Marks(meter, Call("chat", CHAT, "r"))
    meter.ids += [7]  # vLLM counted the first token before it sent the role's event
    first = marks('{"id":"c1","created":5,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    assert first == ':r {"prompt":[1,2,3],"id":"c1","created":5}\n'  # no ids: no text in it
    assert marks('{"choices":[{"index":0,"delta":{"content":"a"}}]}') == ":t 7\n"
    meter.ids += [8, 9]  # two tokens in one event (a multibyte character, or a slow reader)
    assert marks('{"choices":[{"index":0,"delta":{"content":"bc"}}]}') == ":t 8 9\n"
    assert marks('{"choices":[],"usage":{}}') == ""


def _stream(ids_per_event: list[list[int]]) -> bytes:
    out = [':r {"prompt":[1,2],"id":"x","created":9}\n']
    for n, ids in enumerate(ids_per_event):
        out.append((":t " + " ".join(map(str, ids)) + "\n" if ids else "") + f'data: {{"n":{n}}}\n\n')
    return "".join(out).encode() + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_relayed_strips_the_marks_and_keeps_the_ids_of_whole_events_only(size):
    wire = _stream([[5], [6, 7], [], [8]])
    relayed, out = resume.Relayed(), b""
    for i in range(0, len(wire), size):
        out += relayed.feed(wire[i:i + size])
    assert out == b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"n":2}\n\ndata: {"n":3}\n\ndata: [DONE]\n\n'
    assert relayed.resume() == Resume((1, 2), (5, 6, 7, 8), "x", 9)


def test_an_event_cut_half_way_is_neither_relayed_nor_counted():
    wire = _stream([[5], [6]])
    relayed = resume.Relayed()
    cut = wire.index(b":t 6")
    assert relayed.feed(wire[:cut + 8]) == b'data: {"n":0}\n\n'
    assert relayed.resume().output_ids == (5,)
    assert resume.Relayed().resume() is None  # nothing sent yet: the request goes again as it was


def test_the_continuation_asks_for_the_rest_from_the_token_ids():
    r = Resume((1, 2), (5, 6, 7, 8), "x", 9)
    body = resume.continuation("chat", {**CHAT, "min_tokens": 6, "seed": 1, "cache_salt": "s"}, r)
    assert body == {"model": "m", "prompt": [1, 2, 5, 6, 7, 8], "stream": True, "max_tokens": 6, "min_tokens": 2,
                    "temperature": 0, "seed": 1, "cache_salt": "s", "stream_options": {"include_usage": True}}
    no_max = resume.continuation("chat", {**CHAT, "max_tokens": None}, r)
    assert no_max["max_tokens"] is None  # to the context's end, as before
    assert resume.continuation("completions", {"model": "m", "prompt": "a", "stream": True}, r)["max_tokens"] == 12
    with pytest.raises(ValueError):
        resume.continuation("chat", {**CHAT, "max_tokens": 4}, r)


def test_completions_default_max_tokens_is_vllms():
    from raylm import _vllm

    assert _vllm.load("CompletionRequest").model_fields["max_tokens"].default == resume.COMPLETIONS_MAX_TOKENS


def _rewrite(endpoint: str, body: dict, payloads: list[dict]) -> list[dict]:
    call = Call(endpoint, body, "r", resume=Resume((1, 2), (5, 6), "chatcmpl-x", 9))

    async def source():
        for p in payloads:
            yield json.dumps(p)

    async def run():
        return [json.loads(p) async for p in resume.rewritten(source(), call)]
    return asyncio.run(run())


def test_continuation_chunks_read_as_the_original_streams():
    cmpl = [{"id": "cmpl-y", "object": "text_completion", "created": 11, "model": "m",
             "choices": [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None, "stop_reason": None,
                          "prompt_token_ids": [1, 2, 5, 6], "token_ids": [3]}]},
            {"id": "cmpl-y", "object": "text_completion", "created": 11, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}}]
    chat = _rewrite("chat", CHAT, cmpl)
    assert chat[0] == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 9, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": "ab"}, "logprobs": None, "finish_reason": None}]}
    assert chat[1]["usage"] == {"prompt_tokens": 2, "total_tokens": 7, "completion_tokens": 5}
    text = _rewrite("completions", {"model": "m", "prompt": "a", "stream": True, "return_token_ids": True}, cmpl)
    assert text[0]["id"] == "chatcmpl-x" and text[0]["choices"][0]["prompt_token_ids"] is None
    assert text[0]["choices"][0]["token_ids"] == [3]
    assert resume.whole_usage(Usage(4, 4, 3, "r2"), Resume((1, 2), (5, 6), "x", 9)) == Usage(2, 2, 5, "r2")


def test_a_resumable_streams_engine_failure_cuts_it_and_a_bad_request_still_answers():
    async def failing(exc):
        yield '{"a":1}'
        raise exc

    async def frames(exc):
        return [f async for f in sse_frames(failing(exc), "r", marks=lambda p: ":t 1\n")]

    with pytest.raises(StreamAborted):
        asyncio.run(frames(RuntimeError("engine dead")))
    out = asyncio.run(frames(errors.InvalidRequestError("bad")))
    assert out[0] == ':t 1\ndata: {"a":1}\n\n' and out[1].startswith('data: {"error"')


def test_a_resumed_stream_waits_ahead_of_everyone_and_is_not_refused_for_the_wait():
    async def run():
        admission = Admission(AdmissionConfig(max_running=1, burst=0, max_queued=1, max_queue_wait_s=0.001))
        order = []

        async def one(name, first=False):
            async with admission.slot(Tenant(name), 1, first=first):
                order.append(name)
                await asyncio.sleep(0.01)

        running = asyncio.create_task(one("a"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(one("b"))
        await asyncio.sleep(0)
        resumed = asyncio.create_task(one("resumed", first=True))
        await asyncio.gather(running, resumed, return_exceptions=True)
        with pytest.raises(errors.OverloadedError):  # the queue of one was full: the last waiter made room
            await waiting
        return order
    assert asyncio.run(run()) == ["a", "resumed"]
