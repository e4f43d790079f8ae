"""Hostile input: whatever a client sends, the answer is a 2xx or a 4xx in the one error shape, never a 5xx."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import AUTH

VALID = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/v1/embeddings": {"model": "all-minilm-l6-v2", "input": "hi"},
    "/v1/responses": {"model": "tiny", "input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/messages/count_tokens": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/score": {"model": "all-minilm-l6-v2", "queries": "hi", "documents": ["a", "b"]},
    "/v1/rerank": {"model": "all-minilm-l6-v2", "query": "hi", "documents": ["a", "b"]},
    "/tokenize": {"model": "tiny", "prompt": "hi"},
    "/detokenize": {"model": "tiny", "tokens": [5, 6]},
}
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "n", "stream", "stop",
          "logprobs", "seed", "stream_options", "response_format", "tools", "encoding_format", "dimensions",
          "logit_bias", "user", "max_output_tokens", "instructions", "system", "queries", "documents", "query",
          "tokens", "top_n", "add_special_tokens"]
# Small numbers and a few huge ones: a valid `n` of thousands would only make the test slow.
NUMBERS = st.one_of(st.integers(-3, 4), st.sampled_from([2**31, -(2**63), 10**30]),
                    st.floats(allow_nan=False, allow_infinity=False, width=32))
VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _nested(depth: int, leaf: str) -> str:
    """JSON text of `leaf` inside `depth` lists (written out: json.dumps itself recurses)."""
    return "[" * depth + json.dumps(leaf) + "]" * depth


CASES = [  # what a fuzzer found: each was a 500
    ("/v1/chat/completions", f'{{"model": "tiny", "messages": {_nested(5000, "x")}}}'.encode()),
    ("/v1/embeddings", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/embeddings", f'{{"model": "all-minilm-l6-v2", "input": {_nested(300, "x")}}}'.encode()),
    ("/v1/embeddings", json.dumps({"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode()),
]


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)


@pytest.mark.parametrize(("path", "raw"), CASES)
def test_what_the_fuzzer_found_is_a_4xx(service, path, raw):
    r = httpx.post(f"{service.url}{path}", content=raw, headers={"content-type": "application/json", **AUTH}, timeout=60)
    _check(r)
    assert 400 <= r.status_code < 500


def test_unknown_routes_wrong_methods_and_big_bodies_get_the_error_shape(service):
    for r, status in ((httpx.get(f"{service.url}/v1/nope", timeout=30), 404),
                      (httpx.get(f"{service.url}/v1/chat/completions", timeout=30), 405),
                      (httpx.post(f"{service.url}/v1/completions", content=b"x" * (17 * 2**20), headers=AUTH, timeout=60), 413)):
        assert r.status_code == status, r.text
        _check(r)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(path=st.sampled_from(sorted(VALID)), field=st.sampled_from(FIELDS), value=VALUES)
def test_mutated_requests_never_get_a_5xx(service, path, field, value):
    body = {**VALID[path], field: value}
    with httpx.Client(timeout=60, headers=AUTH) as client:
        _check(client.post(f"{service.url}{path}", json=body))
