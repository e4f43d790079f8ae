"""`GET /status` behind the API key, and the playground's files served with a strict content policy."""

import time

import httpx

from helpers import AUTH


def test_status_shows_replicas_load_and_last_minute_latency(service, client):
    for _ in range(3):
        list(client.completions.create(model="tiny", prompt="Hello", max_tokens=8, stream=True))
    assert httpx.get(f"{service.url}/status", timeout=30).status_code == 401
    deadline = time.monotonic() + 10
    while True:  # replicas report every second: wait for a report made after the requests above
        body = httpx.get(f"{service.url}/status", headers=AUTH, timeout=30).json()
        tiny = body["models"]["tiny"]
        if (tiny["replica_reports"] and tiny["tokens_per_s"] > 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(body["models"]) == {"tiny", "tiny-think", "tiny-lora", "smollm2-135m-instruct",
                                   "all-minilm-l6-v2"}
    assert tiny["status"] == "HEALTHY" and tiny["replicas"] == {"RUNNING": 1}
    assert len(tiny["replica_reports"]) == 1 and tiny["replica_reports"][0]["phase"] == "ready"
    assert tiny["answered"] >= 3 and tiny["tenant_shares"]["default"] > 0
    assert 0 < tiny["ttft_p50_s"] <= tiny["ttft_p99_s"] < 30 and tiny["tokens_per_s"] > 0


def test_playground_files_come_with_a_content_policy_and_nothing_else(service):
    page = httpx.get(f"{service.url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/playground/../ingress.py", "/playground/%2e%2e/ingress.py", "/playground/nope.js"):
        r = httpx.get(f"{service.url}{path}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route", path
