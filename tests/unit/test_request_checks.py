"""What a replica checks before a request takes a queue place: media URLs in every shape, prompt counting with
bounded work, fair turns on the counting thread."""

import asyncio

import pytest

from raylm import errors
from raylm.engine import counting, media

IMAGE = "https://img.example/cat.png"
SHAPES = {  # every way a request can carry a media URL
    "chat image_url": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}]},
    "chat image_url string": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": IMAGE}]}]},
    "chat video_url": {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": IMAGE}}]}]},
    "chat audio_url": {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": IMAGE}}]}]},
    "responses input_image": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE}]}]},
    "responses input_file": {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": IMAGE}]}]},
    "anthropic image": {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": IMAGE}}]}]},
    "anthropic in a tool result": {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
        {"type": "image", "source": {"type": "url", "url": IMAGE}}]}]}]},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_text_model_refuses_media_in_every_shape(shape):
    with pytest.raises(errors.InvalidRequestError) as exc:
        media.check(SHAPES[shape], "m", multimodal=False, allowed_domains=None, local_folder=None)
    assert (exc.value.status, exc.value.code) == (400, "unsupported_content")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_multimodal_model_fetches_only_from_listed_domains(shape):
    with pytest.raises(errors.InvalidRequestError) as exc:
        media.check(SHAPES[shape], "m", multimodal=True, allowed_domains=None, local_folder=None)
    assert exc.value.code == "media_url_not_allowed"
    assert media.check(SHAPES[shape], "m", multimodal=True, allowed_domains=["img.example"], local_folder=None)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "FILE:///etc/passwd", " File:/etc/passwd",
                                 "http://169.254.169.254/latest", "https://img.example.evil.net/x.png",
                                 "ftp://img.example/x", "gopher://img.example", "http://[::1", "//img.example/x"])
def test_every_refused_url_gets_the_same_answer(url):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    with pytest.raises(errors.InvalidRequestError) as exc:
        media.check(body, "m", multimodal=True, allowed_domains=["img.example"], local_folder=None)
    assert (exc.value.status, exc.value.message) == (400, media.MEDIA_REFUSED)  # nothing tells hosts apart


def test_data_urls_and_allowed_local_files_pass():
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "File:///srv/images/a.png"}}]}]}
    assert media.check(body, "m", multimodal=True, allowed_domains=None, local_folder="/srv/images") is False


def _encode(text: str) -> list[int]:
    return text.split()  # a word a token: enough to test the bounds


def test_a_chat_prompt_counts_tools_documents_and_tool_calls():
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                         {"role": "user", "content": [{"type": "text", "text": "and tomorrow"}]}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "a b c d e"}}],
            "documents": [{"title": "t", "text": "x y z"}]}
    texts = counting.chat_texts(body)
    assert "be brief" in texts and '{"city": "Paris"}' in texts and "and tomorrow" in texts
    assert any("a b c d e" in t for t in texts) and any("x y z" in t for t in texts)


def test_a_body_far_over_the_context_is_refused_without_tokenizing():
    calls = []

    def encode(text):
        calls.append(len(text))
        return _encode(text)

    assert counting.count(encode, ["word " * 1_000_000], budget=4096, max_token_bytes=80) > 4096
    assert calls == []


def test_a_long_prompt_is_counted_in_slices_and_stops_once_over():
    calls = []

    def encode(text):
        calls.append(len(text))
        return _encode(text)

    text = "word " * 200_000  # 1 MB: under the cheap bound with long tokens, far over a 4k context
    n = counting.count(encode, [text], budget=4096, max_token_bytes=4096)
    assert n > 4096 and sum(calls) < 100_000  # stopped after a few slices, not the whole megabyte
    assert counting.count(_encode, ["word " * 5000], budget=0, max_token_bytes=80) == 5000


def test_a_sliced_count_near_the_limit_is_redone_whole():
    text = "word " * 4096
    assert counting.count(_encode, [text], budget=4096, max_token_bytes=80) == 4096


def test_the_counting_thread_takes_tenants_in_turn():
    from raylm.serve.replica.admission import Turns

    async def main():
        turns, order = Turns(), []

        async def request(tenant, i):
            async with turns.turn(tenant):
                order.append(f"{tenant}{i}")
                await asyncio.sleep(0.01)

        heavy = [asyncio.create_task(request("heavy", i)) for i in range(5)]
        await asyncio.sleep(0)
        light = asyncio.create_task(request("light", 0))
        await asyncio.gather(*heavy, light)
        return order

    order = asyncio.run(main())
    assert order.index("light0") <= 2  # one heavy request ahead of it at most, not all five


def test_a_small_body_is_told_from_a_large_one_by_its_strings_and_items_whatever_its_shape():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": 16}
    assert counting.within(chat, 8192)
    assert not counting.within({**chat, "messages": [{"role": "user", "content": "x" * 8193}]}, 8192)
    assert not counting.within({"model": "m", "prompt": list(range(1_000_000))}, 8192)  # ids: an item each
    assert counting.within({"model": "m", "prompt": list(range(100))}, 8192)
    deep: list = []
    for _ in range(100_000):  # nesting deeper than recursion goes: walked in a loop, stopped once over
        deep = [deep]
    assert not counting.within({"input": deep}, 8192)
