"""Every bad request gets the OpenAI error body with the right 4xx, and the service keeps serving."""

import httpx
import pytest

from helpers import AUTH

TOO_LONG = "hello " * 400  # > the tiny model's 256-token context

CASES = [
    # (path, raw body, status, param, code)
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "tiny"}', 400, "messages", None),
    ("/v1/chat/completions", b'{"model": "nope", "messages": []}', 404, "model", "model_not_found"),
    ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "model", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400, "max_tokens", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 10000000}', 400, "max_tokens", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400, "temperature", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream": true, "n": "two"}', 400, "n", None),
    ("/v1/completions", ('{"model": "tiny", "prompt": "%s"}' % TOO_LONG).encode(), 400, None, None),
    ("/v1/chat/completions", ('{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "%s"}]}'
                              % TOO_LONG).encode(), 400, None, None),
    ("/v1/embeddings", b'{"model": "tiny", "input": "x"}', 400, "model", "unsupported_endpoint"),
    ("/v1/embeddings", b'{"model": "all-minilm-l6-v2", "input": 42}', 400, "input", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), CASES)
def test_bad_request_gets_openai_error(service, path, body, status, param, code):
    r = httpx.post(f"{service.url}{path}", content=body, headers={"content-type": "application/json", **AUTH},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["code"], str)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error
    if code is not None:
        assert error["code"] == code


def test_prompt_too_long_says_so(service):
    r = httpx.post(f"{service.url}/v1/completions", json={"model": "tiny", "prompt": TOO_LONG}, headers=AUTH, timeout=60)
    assert r.status_code == 400
    assert "context length" in r.json()["error"]["message"].lower()


def test_sdk_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-5)


def test_service_keeps_serving_after_errors(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens == 3
