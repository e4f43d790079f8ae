"""The OpenAI routes, driven by the unmodified OpenAI SDK against a real Ray Serve + vLLM service."""

import json
import math

import httpx
import openai
import pytest
from helpers import AUTH

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def test_models_lists_every_served_model(client):
    served = {"tiny", "tiny-think", "tiny-lora", "tiny-a", "tiny-b", SMOLLM2, MINILM}  # tiny-a, b: adapters
    assert {m.id for m in client.models.list().data} == served
    assert client.models.retrieve(SMOLLM2).id == SMOLLM2
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"


def test_bundled_chat_model_answers_sensibly_without_sampling_parameters(client):
    """The README's example as a new user sends it: the bundled model's default temperature (0, vLLM's
    generation config) applies; at vLLM's own 1.0 it answered noise."""
    answers = [client.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24).choices[0].message.content for _ in range(3)]
    assert all("Paris" in a for a in answers), answers


def test_bundled_smollm2_knows_paris(client):
    r = client.completions.create(model=SMOLLM2, prompt="The capital of France is", max_tokens=4,
                                  temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    assert r.usage.completion_tokens == 4


def test_chat_applies_template_and_answers(client):
    r = client.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 10  # the chat template wrapped the 7-word question


def test_stream_equals_non_stream_and_reports_usage(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hello world"}], max_tokens=12,
                  temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(service):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{service.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_sampling_parameters_are_honoured(client):
    base = dict(model="tiny", prompt="The quick brown")
    seeded = [client.completions.create(**base, max_tokens=8, temperature=1.0, top_p=0.9, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    two = client.completions.create(**base, max_tokens=8, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    lp = client.completions.create(**base, max_tokens=8, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True})
    assert len(lp.choices[0].logprobs.tokens) == 8
    assert all(len(t) <= 2 + 1 for t in lp.choices[0].logprobs.top_logprobs)
    forced = client.completions.create(**base, temperature=0, max_tokens=20,
                                       extra_body={"min_tokens": 20, "ignore_eos": True})
    assert forced.usage.completion_tokens == 20
    greedy = client.completions.create(**base, temperature=0, max_tokens=20,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy.strip()[:3]
    cut = client.completions.create(**base, temperature=0, max_tokens=20, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert stop not in cut.choices[0].text
    assert cut.choices[0].finish_reason == "stop"


def test_embeddings_are_normalized_384d(client):
    one = client.embeddings.create(model=MINILM, input="hello world")
    many = client.embeddings.create(model=MINILM, input=["hello world", "goodbye moon", "ray"])
    assert len(one.data) == 1 and len(many.data) == 3
    for item in many.data:
        assert len(item.embedding) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-3)
    assert many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-4)


def test_health_and_ready(service):
    assert httpx.get(f"{service.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/ready", timeout=30)
    assert ready.status_code == 200
    assert set(ready.json()["models"].values()) == {"ready"}


def test_request_id_travels_in_and_out(service):
    r = httpx.post(f"{service.url}/v1/completions", headers={"x-request-id": "abc-123", **AUTH},
                   json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
