"""The chaos service: local Ray + Serve, tiny vLLM engines configured per scenario.

    tiny   1 replica, small batch and queue     overload, fairness, auth, client disconnect
    pair   2 replicas, fast health checks       SIGKILL of a replica, a stalled engine
    auto   autoscaling 1..2                     scale up with load, down when idle
    cold   autoscaling 0..1, a 50 ms wait bound a request at zero replicas waits for the cold start; then
                                                admission bounded by time at 2× capacity
    relay  2 replicas, room for 70 streams      SIGKILL of a replica under 70 streams: each goes on elsewhere;
                                                under a batch; a changed config and a scale-down (services of their own)
"""

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
from ray import serve

from helpers import TINY_ENGINE_ARGS, free_port

from raylm import _ray
from raylm.bench.load import completion_body, send
from raylm.config import AppConfig, ModelConfig
from raylm.contract import APP_NAME

KEYS = {"light": "sk-light-test", "heavy": "sk-heavy-test", "gold": "sk-gold-test", "free": "sk-free-test"}
# One OpenMP thread per tiny engine, left to the OS scheduler: two threads spin on both cores (120% CPU
# measured) and starve the ingress and replicas; with one, capacity went from 14.7 to 21.8 requests/s.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
LIMITS = {"max_running": 4, "max_queued": 8, "burst": 4, "retry_after_s": 1}


def tiny(name: str, tiny_model, **overrides) -> ModelConfig:
    return ModelConfig(**{"name": name, "source": str(tiny_model), "num_cpus": 0.1, "engine_args": TINY_ENGINE_ARGS,
                          "env": ENV, "admission": LIMITS, **overrides})


def chaos_config(tiny_model, only: tuple[str, ...] = ()) -> AppConfig:
    """The scenario's service; `only` keeps just the models named (all of them by default)."""
    models = (
        tiny("tiny", tiny_model),
        tiny("pair", tiny_model, replicas=2, health={"period_s": 2, "probe_timeout_s": 3}),
        # A new replica must start while the first one is busy: two engines with two spinning OpenMP
        # threads each on 2 cores took 95 s to over 150 s to start the second one.
        tiny("auto", tiny_model, autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                              "upscale_delay_s": 1, "downscale_delay_s": 90}),
        tiny("cold", tiny_model, autoscaling={"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 5},
             admission={**LIMITS, "max_queue_wait_s": 0.05}),
        # 70 streams at once on two replicas, one of them killed: room for all of them on the survivor too.
        tiny("relay", tiny_model, replicas=2, health={"period_s": 2, "probe_timeout_s": 3},
             admission={"max_running": 72, "max_queued": 16, "burst": 0, "retry_after_s": 1}),
    )
    return AppConfig(
        models=tuple(m for m in models if not only or m.name in only),
        serve={"port": free_port(), "metrics_port": free_port(), "num_cpus": 2, "cold_start_timeout_s": 120,
               "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
               "tenants": {"gold": {"weight": 2}, "free": {"weight": 1}}},
    )


def replicas(model: str) -> dict[str, int]:
    deployment = serve.status().applications[APP_NAME].deployments[f"model-{model}"]
    return {str(state): n for state, n in deployment.replica_states.items()}


def running_replicas(model: str) -> int:
    return replicas(model).get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until `predicate()` holds; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not true after {timeout_s}s: {predicate.__doc__ or predicate}")
        time.sleep(every_s)
    return time.monotonic() - start


def report(name: str, **figures) -> None:
    print(f"\nCHAOS {name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in figures.items()), flush=True)


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def steady_load(url: str, stop, results: list, model: str = "relay", headers: dict | None = None) -> None:
    """4 streams and 2 whole requests back to back until `stop` (a threading.Event), each on a new connection
    (a kept-alive one that the server closes while a request is on its way is the client's to retry, as HTTP
    has it); `results` gets (time, result) of each."""
    async def run():
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            async def worker(stream: bool):
                body = completion_body(model, "hello world " * 5, 64)
                if not stream:
                    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
                while not stop.is_set():
                    results.append((time.monotonic(), await send(client, f"{url}/v1/completions", body,
                                                                 auth("light") if headers is None else headers)))
            await asyncio.gather(*(worker(i < 4) for i in range(6)))
    asyncio.run(run())


@contextlib.contextmanager
def steady(url: str, model: str = "relay", headers: dict | None = None):
    """steady_load on a thread while the block runs, stopped and joined when it ends; yields its `results`
    (sum them up with `tally`)."""
    stop, results = threading.Event(), []
    loader = threading.Thread(target=steady_load, args=(url, stop, results, model, headers), daemon=True)
    loader.start()
    try:
        yield results
    finally:
        stop.set()
        loader.join(240)


def tally(results: list) -> dict:
    """steady_load's results: the failed ones, how many were streams, and the failures' kinds."""
    failed = [r for _, r in results if not r.ok]
    return {"failed": failed, "streams": sum(1 for _, r in results if r.itl_s or r.ttft_s),
            "failures": ";".join(sorted({f"{r.status}:{r.error}" for r in failed}))[:200]}


async def load(url: str, fn):
    """Run `fn(client, completions_url)` with a client sized for floods. The process's heap so far (torch,
    Ray, the service's objects) is frozen first, as the servers' are (`_ray.freeze_heap`): the collector
    never walks it again, and the client's pauses stay its own young objects' (ClientPauses)."""
    _ray.freeze_heap()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10),
                                 limits=httpx.Limits(max_connections=400)) as client:
        return await fn(client, f"{url}/v1/completions")


def sender(client, url, model, tenant, max_tokens=64, stream=True):
    body = completion_body(model, "hello world " * 5, max_tokens)
    if not stream:
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return lambda i: send(client, url, body, auth(tenant), tag=tenant)
