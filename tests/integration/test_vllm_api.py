"""The rest of the API `vllm serve` answers: Responses, Anthropic Messages, tokenize/detokenize, score and
rerank, structured output; each through raylm's auth and admission, driven by the SDKs where they have a
method."""

import json

import anthropic
import httpx
import jsonschema
import pytest

from helpers import API_KEY, AUTH

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def test_responses_api_through_the_openai_sdk(client):
    r = client.responses.create(model=SMOLLM2, input="What is the capital of France?", max_output_tokens=24)
    assert r.status == "completed" and "Paris" in r.output_text
    events = list(client.responses.create(model=SMOLLM2, input="What is the capital of France?",
                                          max_output_tokens=24, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == r.output_text  # greedy by default


def test_responses_wire_format_names_each_event(service):
    body = {"model": "tiny", "input": "Hello", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{service.url}/v1/responses", json=body, headers=AUTH, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: response.created" and lines[1].startswith("data: {")
    assert "data: [DONE]" not in lines and lines[-2] == "event: response.completed"


def test_anthropic_messages_through_the_anthropic_sdk(service):
    claude = anthropic.Anthropic(base_url=service.url, api_key=API_KEY, max_retries=0, timeout=120)  # x-api-key
    question = [{"role": "user", "content": "What is the capital of France?"}]
    m = claude.messages.create(model=SMOLLM2, max_tokens=24, messages=question)
    assert m.role == "assistant" and "Paris" in m.content[0].text
    with claude.messages.stream(model=SMOLLM2, max_tokens=24, messages=question) as stream:
        assert "".join(stream.text_stream) == m.content[0].text
        assert stream.get_final_message().usage.output_tokens == m.usage.output_tokens
    counted = claude.messages.count_tokens(model=SMOLLM2, messages=question)
    assert counted.input_tokens == m.usage.input_tokens
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=service.url, api_key="wrong", max_retries=0).messages.create(
            model=SMOLLM2, max_tokens=4, messages=question)


@pytest.mark.parametrize("model", ["tiny", MINILM])
def test_tokenize_and_detokenize_round_trip(service, model):
    post = lambda path, body: httpx.post(f"{service.url}{path}", json=body, headers=AUTH, timeout=60)  # noqa: E731
    tokens = post("/tokenize", {"model": model, "prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > 0
    text = post("/detokenize", {"model": model, "tokens": tokens["tokens"]}).json()["prompt"]
    assert text.strip().lower() == "hello world"  # MiniLM's tokenizer is uncased


def test_score_and_rerank_on_the_embedding_model(service):
    documents = ["Bananas are yellow.", "Paris is the capital of France.", "Ray runs on clusters."]
    post = lambda path, body: httpx.post(f"{service.url}{path}", json=body, headers=AUTH, timeout=60)  # noqa: E731
    scores = post("/v1/score", {"model": MINILM, "queries": "capital of France", "documents": documents}).json()
    best = max(scores["data"], key=lambda d: d["score"])
    assert len(scores["data"]) == 3 and best["index"] == 1
    ranked = post("/v1/rerank", {"model": MINILM, "query": "capital of France", "documents": documents}).json()
    assert [r["index"] for r in ranked["results"]][0] == 1
    wrong = post("/v1/score", {"model": "tiny", "queries": "x", "documents": ["y"]})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported_endpoint"


def test_structured_output_is_schema_valid(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 30},
                             "country": {"type": "string", "enum": ["France", "Germany", "Italy"]},
                             "population": {"type": "integer", "minimum": 0}}}
    r = client.chat.completions.create(
        model=SMOLLM2, max_tokens=80,
        messages=[{"role": "user", "content": "Describe Paris as JSON with city, country and population."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)  # the backend constrained decoding
