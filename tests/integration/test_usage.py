"""Usage kept per request, quotas, traces and the access log, on the shared service (tenants `ledger` and
`metered` are this module's own)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import API_KEY, LEDGER_KEY, METERED_KEY, METERED_QUOTA
from openai import OpenAI

LEDGER = {"authorization": f"Bearer {LEDGER_KEY}"}


def _usage_page(url: str, start: int, kind: str = "completions", key: str = API_KEY, **params) -> dict:
    r = httpx.get(f"{url}/v1/organization/usage/{kind}", params={"start_time": start, "bucket_width": "1h", **params},
                  headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _totals(page: dict, project: str) -> dict[str, int]:
    rows = [r for b in page["data"] for r in b["results"] if r["project_id"] == project]
    keys = ("num_model_requests", "input_tokens", "output_tokens")
    return {k: sum(r[k] for r in rows) for k in keys if all(k in r for r in rows)}


def _access_lines(service, request_ids: set[str], timeout_s: float = 15.0) -> dict[str, dict]:
    path = Path(service.log_dir) / "raylm" / "access.log"
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
            found = {r["request_id"]: r for r in lines if r["request_id"] in request_ids}
            if len(found) == len(request_ids):
                return found
        time.sleep(0.3)
    raise AssertionError(f"access log: {len(found)} of {len(request_ids)} lines after {timeout_s} s")


def test_usage_totals_equal_what_clients_received(service, tmp_path):
    """A mixed run of one tenant: whole and streamed answers, n > 1, a failure, a stream its client cut off, an
    embedding and a Batch API line. The usage API's sums equal the clients' own `usage`, and the cut stream is
    there with what the engine made for it."""
    url, start = service.url, int(time.time()) - 1
    client = OpenAI(base_url=f"{url}/v1", api_key=LEDGER_KEY, max_retries=0, timeout=120)
    prompt, completion, requests = 0, 0, 0
    for i in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=5 + i)
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
        requests += 1
    r = client.completions.create(model="tiny", prompt="count: 1 2 3", max_tokens=4, n=2)
    prompt, completion, requests = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens, requests + 1
    for i in range(2):
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=6, stream=True,
            stream_options={"include_usage": True}))
        prompt += chunks[-1].usage.prompt_tokens
        completion += chunks[-1].usage.completion_tokens
        requests += 1
    with pytest.raises(Exception):  # a bad value: refused before the engine, no tokens
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-3)
    cut = "usage-cut-stream"
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={**LEDGER, "x-request-id": cut}, timeout=60,
                      json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "long"}],
                            "max_tokens": 400, "ignore_eos": True, "stream": True}) as cut_stream:
        received = 0
        for line in cut_stream.iter_lines():
            received += line.startswith("data: {")
            if received == 3:
                break  # the client goes away: its engine request is aborted
    embedded = client.embeddings.create(model="all-minilm-l6-v2", input=["one", "two three"])
    batch_prompt, batch_completion = _one_batch_line(client, tmp_path)

    lines = _access_lines(service, {cut})
    cut_line = lines[cut]
    assert cut_line["status"] == 499 and cut_line["error_code"] == "client_gone"
    assert cut_line["completion_tokens"] >= 2 and cut_line["prompt_tokens"] > 0  # (its first chunk: the role)
    time.sleep(2.5)  # every ingress replica's buffer sent (serve.usage.flush_interval_s: 1)
    page = _usage_page(url, start, group_by="project_id")
    assert _totals(page, "ledger") == {
        "num_model_requests": requests + 2,  # and the cut stream, and the batch line
        "input_tokens": prompt + cut_line["prompt_tokens"] + batch_prompt,
        "output_tokens": completion + cut_line["completion_tokens"] + batch_completion}
    embeddings = _usage_page(url, start, kind="embeddings", group_by="project_id")
    assert _totals(embeddings, "ledger")["input_tokens"] == embedded.usage.prompt_tokens
    # A tenant's key sees its own tenant only; the admin key every tenant.
    mine = _usage_page(url, start, key=LEDGER_KEY, group_by="project_id")
    assert {r["project_id"] for b in mine["data"] for r in b["results"]} == {"ledger"}
    # `raylm usage` prints the same figures as a table (the tenant's own key: its rows and their total).
    table = subprocess.run([str(Path(sys.executable).parent / "raylm"), "usage", "--url", url, "--days", "1",
                            "--bucket", "1h", "--group-by", "project_id"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OPENAI_API_KEY": LEDGER_KEY, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    print(f"\nUSAGE clients received: {requests} answers with usage, prompt {prompt}, completion {completion}; "
          f"cut stream: prompt {cut_line['prompt_tokens']}, completion {cut_line['completion_tokens']} "
          f"(client saw {received} data lines); batch line: prompt {batch_prompt}, completion {batch_completion}; "
          f"embeddings: {embedded.usage.prompt_tokens}\n{table.stdout}")
    total = next(line for line in table.stdout.splitlines() if line.strip("│ ").startswith("total"))
    cells = [c.strip().replace(",", "") for c in total.split("│") if c.strip()]  # total, requests, in, cached, out
    assert (cells[1], cells[2], cells[4]) == (str(requests + 2), str(prompt + cut_line["prompt_tokens"] + batch_prompt),
                                              str(completion + cut_line["completion_tokens"] + batch_completion))


def _one_batch_line(client: OpenAI, tmp_path: Path) -> tuple[int, int]:
    line = {"custom_id": "u1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "batch"}], "max_tokens": 3}}
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
    f = client.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 180
    while b.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        b = client.batches.retrieve(b.id)
    assert b.status == "completed", b
    usage = json.loads(client.files.content(b.output_file_id).text)["response"]["body"]["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_quotas_refuse_with_openais_error_and_headers(service):
    url, metered = service.url, {"authorization": f"Bearer {METERED_KEY}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    too_big = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 10_000}, headers=metered, timeout=60)
    assert too_big.status_code == 429 and too_big.json()["error"]["code"] == "rate_limit_exceeded"
    answers = [httpx.post(f"{url}/v1/completions", json=body, headers=metered, timeout=60)
               for _ in range(METERED_QUOTA["requests_per_minute"] + 2)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["4", "3", "2", "1", "0", "0", "0"]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.json()["error"]["type"] == "requests"
    assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000 and int(refused.headers["Retry-After"]) >= 1
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                   "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert header in refused.headers and header in answers[0].headers
    assert answers[0].headers["x-ratelimit-limit-tokens"] == str(METERED_QUOTA["tokens_per_minute"])
    # The OpenAI SDK reads them: its error is a RateLimitError naming the code.
    import openai
    sdk = OpenAI(base_url=f"{url}/v1", api_key=METERED_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as err:
        sdk.completions.create(**body)
    assert err.value.code == "rate_limit_exceeded"
    status = httpx.get(f"{url}/status", headers={"authorization": f"Bearer {API_KEY}"}, timeout=60).json()
    assert status["quotas"]["metered"]["requests"] == 5
    assert "other" not in status["quotas"]


def test_a_streamed_request_is_one_trace_whose_spans_add_up_to_the_clients_latency(service, otlp):
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        http.get(f"{service.url}/health")  # the connection open: the latency is the request's alone
        began = time.perf_counter()
        with http.stream("POST", f"{service.url}/v1/chat/completions", headers={"traceparent": parent},
                         json={"model": "tiny", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 8,
                               "stream": True}) as r:
            echoed = r.headers["traceparent"]
            body = b"".join(r.iter_bytes())
        latency_ms = (time.perf_counter() - began) * 1000
    assert body.endswith(b"data: [DONE]\n\n")
    trace_id = "ab" * 16
    assert echoed.startswith(f"00-{trace_id}-") and echoed.endswith("-01")

    def complete(spans) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {"POST /v1/chat/completions", "replica", "decode", "relay", "llm_request"} <= names
    otlp.wait_for(complete, timeout_s=30)
    spans = otlp.trace(trace_id)
    from otlp import tree
    print("\nTRACE\n" + tree(spans))
    by_id = {s.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert root.parent_span_id == "cd" * 8 and root.kind == "server"
    assert all(s.parent_span_id in by_id for s in spans if s is not root)  # one connected trace
    replica = next(s for s in spans if s.name == "replica")
    assert by_id[replica.parent_span_id].name == "forward" and replica.service_name == "raylm-tiny"
    assert replica.attributes["gen_ai.usage.output_tokens"] == 8 and root.attributes["gen_ai.request.stream"] is True
    assert by_id[next(s for s in spans if s.name == "llm_request").parent_span_id].name == "replica"  # vLLM's own
    children = [s for s in spans if s.parent_span_id == root.span_id]
    assert [s.name for s in sorted(children, key=lambda s: s.start_ns)] == ["auth", "read body", "forward", "relay"]
    assert abs(sum(s.duration_ms for s in children) - root.duration_ms) < 5
    assert abs(root.duration_ms - latency_ms) < 5, (root.duration_ms, latency_ms)
    # Its first token at the edge: after the replica had it (one clock: same host), before the stream ended.
    ttft_ms = root.attributes["gen_ai.server.time_to_first_token"] * 1000
    first_at_replica_ms = (next(s for s in spans if s.name == "prefill").end_ns - root.start_ns) / 1e6
    assert first_at_replica_ms - 2 < ttft_ms < root.duration_ms, (first_at_replica_ms, ttft_ms, root.duration_ms)
    print(f"TRACE client {latency_ms:.1f} ms, root span {root.duration_ms:.1f} ms")
