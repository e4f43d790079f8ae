"""LoRA adapters through the service: served by name on their base model's replicas, listed with their parent,
loaded and unloaded at run time by an admin only, from allowed folders only; a bad adapter fails alone."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
from helpers import AUTH, OTHER_KEY

PROMPTS = ["Hello world", "The quick brown fox"]


def _greedy(client, model: str, prompt: str, **extra) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}, **extra).choices[0].text


def _post(service, path: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, headers=headers, timeout=60)


def test_adapters_are_listed_with_their_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny-a"].parent == "tiny-lora" and cards["tiny-b"].parent == "tiny-lora"
    assert getattr(cards["tiny-lora"], "parent", None) is None
    assert client.models.retrieve("tiny-b").parent == "tiny-lora"


def test_an_unknown_name_is_404_model_not_found(service):
    r = _post(service, "/v1/completions", {"model": "tiny-zzz", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{service.url}/v1/models/tiny-zzz", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_each_adapter_answers_with_its_own_weights_alone_and_batched_together(client):
    base = [_greedy(client, "tiny-lora", p) for p in PROMPTS]
    alone = {name: [_greedy(client, name, p) for p in PROMPTS] for name in ("tiny-a", "tiny-b")}
    assert alone["tiny-a"] != base and alone["tiny-b"] != base and alone["tiny-a"] != alone["tiny-b"]
    # Both adapters and the base at once: in one engine batch (max_loras 2), each request its own weights.
    jobs = [(name, p) for _ in range(3) for name in ("tiny-a", "tiny-b", "tiny-lora") for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _greedy(client, *job), jobs))
    expected = {**alone, "tiny-lora": base}
    assert together == [expected[name][PROMPTS.index(p)] for name, p in jobs]


def test_an_adapter_streams_the_same_text(client):
    whole = _greedy(client, "tiny-a", PROMPTS[0])
    chunks = client.completions.create(model="tiny-a", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_run_time_load_is_for_admins_and_allowed_folders_only(service, lora_dir, tmp_path):
    other = {"authorization": f"Bearer {OTHER_KEY}"}
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(lora_dir / "c")}, other)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
    outside = tmp_path / "outside"
    shutil.copytree(lora_dir / "c", outside)
    for path in (str(outside), f"{lora_dir}/../{outside.parent.name}/outside"):
        r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-c", "lora_path": path})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", r.text
    (lora_dir / "link").symlink_to(outside)
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(lora_dir / "link")})
    assert r.status_code == 403, r.text
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-w", "lora_path": str(lora_dir / "wide")})
    assert r.status_code == 400 and "'tiny-w' has rank 16, over max_lora_rank 8" in r.json()["error"]["message"]
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-a", "lora_path": str(lora_dir / "c")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "name_taken"
    r = _post(service, "/v1/load_lora_adapter", {"lora_path": str(lora_dir / "c")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = _post(service, "/v1/completions", {"model": "tiny-c", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404  # nothing was registered


def test_run_time_load_then_unload(service, client, lora_dir):
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-c", "lora_path": str(lora_dir / "c")})
    assert r.status_code == 200, r.text
    assert client.models.retrieve("tiny-c").parent == "tiny-lora"
    with ThreadPoolExecutor(8) as pool:  # its first requests come together: it loads once, all are answered
        answers = list(pool.map(lambda _: _greedy(client, "tiny-c", PROMPTS[0]), range(8)))
    answer = answers[0]
    assert answers == [answer] * 8
    assert answer != _greedy(client, "tiny-lora", PROMPTS[0])
    assert answer != _greedy(client, "tiny-a", PROMPTS[0])
    r = _post(service, "/v1/unload_lora_adapter", {"lora_name": "tiny-c"})
    assert r.status_code == 200, r.text
    r = _post(service, "/v1/completions", {"model": "tiny-c", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(service, "/v1/unload_lora_adapter", {"lora_name": "tiny-a"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "static_adapter"


def test_an_adapter_that_fails_to_load_is_a_400_naming_it_and_the_replica_stays(service, client, lora_dir):
    broken = lora_dir / "broken"
    shutil.copytree(lora_dir / "c", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = _post(service, "/v1/load_lora_adapter", {"lora_name": "tiny-broken", "lora_path": str(broken)})
    assert r.status_code == 200, r.text  # the folder passes the checks; the weights are read by the replica
    try:
        r = _post(service, "/v1/completions", {"model": "tiny-broken", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_load_failed" and "'tiny-broken'" in error["message"]
        assert _greedy(client, "tiny-a", PROMPTS[0])  # the same replica serves on
    finally:
        _post(service, "/v1/unload_lora_adapter", {"lora_name": "tiny-broken"})


def test_an_adapter_chats(service):
    chat = {"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = _post(service, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-b"


def test_the_batch_api_serves_adapters_by_name(client):
    import json
    import time

    names = ["tiny-a", "tiny-lora", "tiny-b", "tiny-zzz"]
    lines = [json.dumps({"custom_id": name, "method": "POST", "url": "/v1/completions",
                         "body": {"model": name, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                  "ignore_eos": True}}) for name in names]
    upload = client.files.create(file=("lora.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    answers = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        for line in client.files.content(file_id).text.splitlines() if file_id else []:
            row = json.loads(line)
            answers[row["custom_id"]] = row["response"]
    assert answers["tiny-zzz"]["status_code"] == 404
    for name in names[:3]:
        assert answers[name]["body"]["choices"][0]["text"] == _greedy(client, name, PROMPTS[0]), name


def test_status_shows_each_adapter_under_its_model(service, client):
    import time

    _greedy(client, "tiny-b", PROMPTS[1])
    for _ in range(10):  # each replica publishes what it holds every second
        status = httpx.get(f"{service.url}/status", headers=AUTH, timeout=30).json()["models"]["tiny-lora"]
        if status["adapters"]["tiny-b"]["held_by"] == 1:
            break
        time.sleep(0.5)
    assert status["adapters"]["tiny-b"]["answered"] >= 1 and status["adapters"]["tiny-b"]["held_by"] == 1
    assert set(status["adapters"]) >= {"tiny-a", "tiny-b"} and status["adapter_loads"] >= 2
