"""Routing by the engines' KV cache events (`routing: kv`), on a service of its own: two tiny replicas whose
engines publish what they cache. The block hashes the router computes for a prompt are the ones the engine
reports, and a prompt goes back to the replica whose engine holds it. Not in `make test` (~2 min with its
service's start): `make test-slow`; the hashing, the index and the router's choices are in tests/unit."""

import time

import httpx
import pytest
from scenario import KEYS, chaos_config, tiny

from raylm.serve.edge import kv_events

BLOCK = 32  # tokens per KV block (the CPU backend takes multiples of 32): ~6 full blocks within max_model_len 256
AUTH = {"authorization": f"Bearer {KEYS['light']}"}


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kv_service(tiny_model):
    from raylm.serve.control.service import start

    config = chaos_config(tiny_model, only=("tiny",))
    model = tiny("kv", tiny_model, replicas=2, routing="kv",
                 engine_args={**config.models[0].engine_args, "block_size": BLOCK, "enable_prefix_caching": True})
    # Tenants' caches unsalted, so that this test can compute the engine's hashes (the salt is the ingress's
    # secret; a salted chain is checked against vLLM's own hashing in tests/unit/test_kv_events.py).
    serve_config = config.serve.model_copy(update={"cache_salt": False})
    svc = start(config.model_copy(update={"models": (model,), "serve": serve_config}))
    yield svc
    svc.stop()


def system_prompt(i: int) -> str:
    return f"Prompt {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(40))


def ask(url: str, body: dict) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "kv", "max_tokens": 2, **body}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text


def chat(i: int, n: int) -> dict:
    return {"messages": [{"role": "system", "content": system_prompt(i)}, {"role": "user", "content": f"Q{n}?"}]}


def test_a_prompt_is_matched_by_the_engines_own_block_hashes_and_goes_back_where_it_is_cached(kv_service):
    index = kv_events.EngineIndex()
    deadline = time.monotonic() + 60
    while len(published := kv_events.published("kv")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the service is ready with one replica running
    assert len(published) == 2, published  # each replica published where its engine's events are
    # on the node's address as Ray has it (loopback here), not the host's outside one
    assert all(p["endpoint"].startswith("tcp://127.0.0.1:") for p in published.values()), published
    listener = kv_events.Subscriber("kv", index, lambda: {r: r for r in published})
    try:
        # The ingress's router subscribes with the handle's first call and then loads the tokenizer (seconds;
        # until then requests are matched by their text, as with `prefix`): one call, then time for it.
        ask(kv_service.url, {"messages": [{"role": "user", "content": "Hello"}]})
        time.sleep(8)
        deadline = time.monotonic() + 30
        while (listener.tokens is None or listener.tokens.tokenizer is None) and time.monotonic() < deadline:
            time.sleep(0.1)  # the tokenizer of the folder the replicas published, as the router loads it
        tokens = listener.tokens
        held = {}  # (prompt, ask) → {replica: leading blocks of that request's prompt its engine holds}
        for i in range(4):
            for n in range(3):
                ask(kv_service.url, chat(i, n))
                chain = kv_events.block_hashes(tokens("chat", chat(i, n)), BLOCK)
                assert len(chain) >= 4
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    held[i, n] = {r: index.matched(r, chain) for r in published}
                    if len(chain) in held[i, n].values():
                        break
                    time.sleep(0.2)
                held[i, n]["blocks"] = len(chain)
    finally:
        listener.stop()
    # The hashes the router makes (kv_events.block_hashes of the token ids kv_events.PromptTokens makes) are
    # the engine's: one replica reports every full block of each request's prompt. The other holds none of
    # that system prompt: the later asks went where the first one was cached.
    holders = {}
    for (i, n), counts in held.items():
        blocks = counts.pop("blocks")
        assert sorted(counts.values()) == [0, blocks], (i, n, held)
        holders.setdefault(i, set()).add(max(counts, key=counts.get))
    assert all(len(h) == 1 for h in holders.values()), holders
    # New prefixes go to the replica holding fewest blocks: both replicas got some.
    assert len(set.union(*holders.values())) == 2, holders
