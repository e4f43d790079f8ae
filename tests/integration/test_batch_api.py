"""The OpenAI Batch API, driven by the unmodified OpenAI SDK against the real service (tiny model, MiniLM)."""

import json
import socket
import time

import httpx
import pytest
from helpers import API_KEY, OTHER_KEY, SERVICE_MAX_FILE_BYTES

FINAL = ("completed", "failed", "cancelled", "expired")


def _line(i, model="tiny", url="/v1/chat/completions", max_tokens=8):
    body = ({"model": model, "input": f"sentence {i}"} if url == "/v1/embeddings" else
            {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": max_tokens})
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def _upload(client, lines):
    return client.files.create(file=("requests.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")


def _wait(client, batch_id, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in FINAL:
            return batch, seen
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {seen[-1]} after {timeout_s}s")


def _lines(client, file_id):
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


@pytest.fixture(scope="module")
def other(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service.url}/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)


def test_a_batch_of_chat_requests_completes_with_an_answer_per_line(client):
    lines = [_line(i) for i in range(12)]
    lines[3] = "{this is not json"
    lines[7] = _line(7, url="/v1/completions")  # not the batch's endpoint: that line fails, not the batch
    lines[9] = _line(9, model="no-such-model")
    upload = _upload(client, lines)
    assert (upload.purpose, upload.filename, upload.bytes) == ("batch", "requests.jsonl", len("\n".join(lines)) + 1)
    assert client.files.retrieve(upload.id).id == upload.id

    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.request_counts.total == 12
    batch, seen = _wait(client, batch.id)
    assert batch.status == "completed", batch
    assert seen[-1] == "completed" and set(seen) <= {"validating", "in_progress", "finalizing", "completed"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (9, 3)
    assert batch.metadata == {"job": "nightly"} and batch.completed_at >= batch.in_progress_at >= batch.created_at

    output, failed = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(12) if i not in (3, 7, 9)]
    for o in output:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
        assert o["response"]["body"]["usage"]["completion_tokens"] <= 8
    by_id = {f["custom_id"]: f for f in failed}
    assert set(by_id) == {None, "req-7", "req-9"}
    assert by_id[None]["error"]["code"] == "invalid_json" and by_id[None]["response"] is None
    assert by_id["req-7"]["error"]["code"] == "invalid_request"
    assert by_id["req-9"]["response"]["status_code"] == 404
    assert by_id["req-9"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="cannot be cancelled"):
        client.batches.cancel(batch.id)


def test_an_embeddings_batch(client):
    batch = client.batches.create(input_file_id=_upload(client, [_line(i, "all-minilm-l6-v2", "/v1/embeddings")
                                                                 for i in range(5)]).id,
                                  endpoint="/v1/embeddings", completion_window="24h")
    batch, _ = _wait(client, batch.id)
    output = _lines(client, batch.output_file_id)
    assert batch.status == "completed" and len(output) == 5 and batch.error_file_id is None
    assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 384 for o in output)


def test_cancelling_answers_every_line_once(client):
    upload = _upload(client, [_line(i, max_tokens=64) for i in range(120)])
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch, _ = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    output, failed = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    ids = [o["custom_id"] for o in output + failed]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(120))  # each line once: answered or not run
    assert {f["error"]["code"] for f in failed} == {"batch_cancelled"}
    assert len(failed) > 0 and batch.request_counts.failed == len(failed)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


def test_tenants_see_only_their_own_files_and_batches(client, other):
    from openai import NotFoundError

    upload = _upload(client, [_line(0)])
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(upload.id), lambda: other.files.content(upload.id),
                 lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.files.delete(upload.id),
                 lambda: other.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(NotFoundError):
            call()
    assert upload.id not in [f.id for f in other.files.list().data]
    assert batch.id not in [b.id for b in other.batches.list().data]
    _wait(client, batch.id)
    assert client.files.delete(upload.id).deleted
    assert upload.id not in [f.id for f in client.files.list().data]


def test_bad_uploads_and_batches_get_clear_errors(service):
    auth = {"authorization": f"Bearer {API_KEY}"}
    url = service.url

    def post_file(content, purpose="batch"):
        return httpx.post(f"{url}/v1/files", headers=auth, data={"purpose": purpose},
                          files={"file": ("f.jsonl", content)}, timeout=30)

    # A declared length past the fixture's batch_max_file_bytes is refused before a byte of the body is read
    # (a raw socket: an HTTP client will not declare more than it sends).
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                  "Content-Type: multipart/form-data; boundary=x\r\n"
                  f"Content-Length: {2 * SERVICE_MAX_FILE_BYTES}\r\n\r\n".encode())
        answer = b""
        while b'"code"' not in answer and (more := s.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b'"type":"invalid_request_error"' in answer.replace(b" ", b"")
    too_many = post_file(b"{}\n" * 1001)  # ...and batch_max_requests 1000
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_requests"
    purpose = post_file(b"{}\n", purpose="fine-tune")
    assert purpose.status_code == 400 and purpose.json()["error"]["param"] == "purpose"
    no_file = httpx.post(f"{url}/v1/files", headers=auth, data={"purpose": "batch"}, timeout=30)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert httpx.post(f"{url}/v1/files", files={"file": ("f", b"{}")}, timeout=30).status_code == 401

    file_id = post_file(b"{}\n").json()["id"]
    for body, param in (({"input_file_id": file_id, "endpoint": "/v1/images", "completion_window": "24h"},
                         "endpoint"),
                        ({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "1h"},
                         "completion_window"),
                        ({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"},
                         "file_id")):
        r = httpx.post(f"{url}/v1/batches", headers=auth, json=body, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    missing = httpx.get(f"{url}/v1/batches/batch_nope", headers=auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "batch_not_found"
    assert httpx.get(f"{url}/v1/batches?limit=0", headers=auth, timeout=30).status_code == 400
