"""Prefix-aware routing against Serve's default routing: vLLM's prefix-cache hit rate and TTFT, same load.

    python benchmarks/prefix_routing.py [--systems default,prefix] [--requests 256] [--concurrency 8]
                                        [--cache-tokens 6144] [--prompts 8] [--ingress-replicas 1]
                                        [--out benchmarks/results]

Each system is a fresh `raylm` service (its own Ray, in a child process of its own, ended by PID after at
most --system-timeout-s), one after the other, on the same workload in the same order:
    default          Serve's power of two choices (routing: default)
    prefix           raylm's PrefixAffinityRouter (routing: prefix; src/raylm/serve/edge/routing.py)
    kv               raylm's KVEventRouter (routing: kv): the same choice, matched against the block hashes
                     each replica's engine reports it holds (vLLM's KV cache events; serve/edge/kv_events.py)
    ray-llm-prefix   opt-in: Ray Serve LLM's PrefixCacheAffinityRouter (its policy, its prefix-tree actor) in
                     the same deployment. As shipped it cannot route raylm's calls: it reads the prompt from
                     an argument with a `.messages`/`.prompt` attribute, raylm's ingress passes a
                     `raylm.contract.Call` whose body is a dict, so it raises ValueError inside
                     choose_replicas and Serve's routing task drops the request (a 503 after
                     serve.cold_start_timeout_s). Here it is subclassed to read the text with raylm's
                     prompt_text, nothing else changed. It calls its tree actor with blocking ray.get on the
                     ingress's event loop (Serve's throughput-optimized mode runs the router there), and that
                     actor takes a logical CPU to schedule, hence serve.num_cpus 4 for every system.
    prefix-tenants   `prefix` with API keys: the requests come from 4 tenants in turn (each system prompt is
                     sent by every tenant), tenants' prefix caches shared (serve.cache_salt: false)
    prefix-salted    the same, each tenant's cache salted (serve.cache_salt: true, the default with keys):
                     what keeping tenants' caches apart costs in hit rate and TTFT
llm-d's prefix scorer needs Kubernetes and its Envoy gateway: not run here.

Model: bundled SmolLM2-135M-Instruct, 2 replicas of num_cpus 1, engine one OpenMP thread each, unbound
(VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=1): a deployment has one environment for all its
replicas, so "replica i on core i" cannot be written; unbound, the kernel spreads the two busy engines over
the two cores. Prefix caching on (vLLM's default for this model; set explicitly), 32-token KV blocks: at
vLLM's CPU default of 128 a ~1,010-token shared start caches 896 tokens at most, a ceiling of ~0.87 on the
hit rate whatever the routing.

Workload (seeded, the same for every system): --prompts system prompts (8) of 1,000 tokens (raylm.bench.prompts'
synthetic text, distinct from their first tokens), 256 streaming chat requests, each one of them (drawn at
random) + a distinct 12-token question, 16 output tokens (ignore_eos), a closed loop at concurrency 8, after
4 warmup requests that share nothing with the workload.

Cache size: --cache-tokens (default 6,144 per replica, vLLM's num_gpu_blocks_override) holds about 5 of
the 8 system prompts besides the running requests: both replicas together hold all 8 only if each keeps its
own share, the case prefix routing is for. --cache-tokens 0 keeps VLLM_CPU_KVCACHE_SPACE=1 GiB (~46k
tokens in bf16): every replica then holds every prompt after its first miss, and the routings converge.

Measured per system: TTFT p50/p99 at the client (first content chunk), and vLLM's prefix-cache hit rate:
the rise of ray_vllm_prefix_cache_hits_total over ray_vllm_prefix_cache_queries_total (tokens; summed over
replicas) on the service's Prometheus endpoint, read before and after the measured requests once Ray has
exported (every 2 s). Prints a table and the ratios against `default`; writes prefix_routing.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers import free_port  # noqa: E402  (one free_port, the tests')

from raylm.models import SMOLLM2  # noqa: E402

RESULTS = HERE / "results"
SYSTEMS = ("default", "prefix", "kv", "ray-llm-prefix", "prefix-tenants", "prefix-salted")
TENANTS = 4  # prefix-tenants, prefix-salted: keys sk-bench-0 .. sk-bench-3
PROMPT_TOKENS, QUESTION_TOKENS, OUTPUT_TOKENS, WARMUP = 1000, 12, 16, 4
BLOCK_TOKENS = 32
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
READY_TIMEOUT_S, LOAD_TIMEOUT_S, METRICS_SETTLE_S = 180.0, 240.0, 30.0  # + stop: < --system-timeout-s
HITS, QUERIES = "ray_vllm_prefix_cache_hits", "ray_vllm_prefix_cache_queries"


def workload(requests: int, prompts: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(warmup bodies, measured bodies): chat requests, each a system prompt + a distinct question."""
    from raylm.bench.prompts import load_tokenizer, synthetic

    tokenizer = load_tokenizer(None, SMOLLM2)
    systems = synthetic(tokenizer, prompts, PROMPT_TOKENS, seed=seed)
    questions = synthetic(tokenizer, requests + WARMUP, QUESTION_TOKENS, seed=seed + 1)
    rng = random.Random(seed)

    def body(system: str | None, question: str) -> dict:
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return {"model": SMOLLM2, "messages": turns, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    warmup = [body(None, q) for q in questions[requests:]]
    return warmup, [body(systems[rng.randrange(prompts)], q) for q in questions[:requests]]


def config(system: str, cache_tokens: int, ingress_replicas: int = 1):
    from raylm.config import AppConfig, ModelConfig, default_models

    smollm2 = default_models()[0]
    # max_model_len 2048: a prompt is ~1,030 tokens, and vLLM refuses a cache smaller than max_model_len.
    engine_args = {**smollm2.engine_args, "max_model_len": 2048, "enable_prefix_caching": True,
                   "block_size": BLOCK_TOKENS}
    if cache_tokens:
        engine_args["num_gpu_blocks_override"] = cache_tokens // BLOCK_TOKENS
    model = ModelConfig(**{**smollm2.model_dump(), "replicas": 2, "num_cpus": 1.0, "engine_args": engine_args,
                           "env": ENV, "routing": "prefix" if system.startswith("prefix") else
                           "kv" if system == "kv" else "default"})
    keys = {"api_keys": [{"tenant": f"t{i}", "key": f"sk-bench-{i}"} for i in range(TENANTS)],
            "cache_salt": system == "prefix-salted"} if system in ("prefix-tenants", "prefix-salted") else {}
    return AppConfig(models=(model,), serve={"port": free_port(), "metrics_port": free_port(), "num_cpus": 4,
                                             "ready_timeout_s": READY_TIMEOUT_S,
                                             "ingress_replicas": ingress_replicas, **keys})


def use_ray_llm_router() -> None:
    """Deploy the model with Ray Serve LLM's router, reading raylm's calls (see the module docstring)."""
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    from raylm.serve.control import builder
    from raylm.serve.edge.routing import prompt_text

    class RayLLMPrefixRouter(PrefixCacheAffinityRouter):
        def _extract_text_from_request(self, pending_request) -> str:
            return prompt_text(pending_request.args[0].body) or " "  # it divides by the text's length

    # Serve imports a router by path and pickles it by value: it must be an attribute of its module.
    RayLLMPrefixRouter.__module__, RayLLMPrefixRouter.__qualname__ = "__main__", "RayLLMPrefixRouter"
    sys.modules["__main__"].RayLLMPrefixRouter = RayLLMPrefixRouter
    serve_options = builder.serve_options

    def with_router(model, *args, **kwargs):
        return {**serve_options(model, *args, **kwargs),
                "request_router_config": {"request_router_class": RayLLMPrefixRouter}}

    builder.serve_options = with_router


def counters(metrics_url: str) -> dict[str, dict[frozenset, float]]:
    """The prefix-cache counters by label set (a label set per engine)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[frozenset, float]] = {HITS: {}, QUERIES: {}}
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError as exc:  # no hit rate then (NaN), but the latencies still count
        print(f"metrics unreadable: {exc!r}", file=sys.stderr)
        return out
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removesuffix("_total")
            if name in out and not s.name.endswith("_created"):
                out[name][frozenset(s.labels.items())] = s.value
    return out


def settled(metrics_url: str, deadline_s: float) -> dict[str, dict[frozenset, float]]:
    """Counters once two reads 3 s apart agree (Ray exports every 2 s), or at the deadline."""
    time.sleep(3)
    last = counters(metrics_url)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        time.sleep(3)
        now = counters(metrics_url)
        if now == last:
            break
        last = now
    return last


def measure(system: str, requests: int, concurrency: int, cache_tokens: int, prompts: int,
            ingress_replicas: int) -> dict:
    """One system, start to stop, in this (child) process."""
    import httpx

    from raylm.bench.load import closed_loop, send
    from raylm.serve.control.service import start

    if system == "ray-llm-prefix":
        use_ray_llm_router()
    warmup, bodies = workload(requests, prompts)
    began = time.monotonic()
    service = start(config(system, cache_tokens, ingress_replicas))
    startup_s = time.monotonic() - began
    try:
        url = f"{service.url}/v1/chat/completions"

        keyed = service.config.serve.api_keys

        def auth(i: int) -> dict[str, str]:  # tenants in turn (with keys)
            return {"authorization": f"Bearer sk-bench-{i % TENANTS}"} if keyed else {}

        async def drive(batch: list[dict], c: int, timeout_s: float):
            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
                return await closed_loop(lambda i: send(client, url, batch[i], auth(i)), c, len(batch), timeout_s)

        asyncio.run(drive(warmup, 2, 60))
        before = settled(service.metrics_url, METRICS_SETTLE_S)
        load = asyncio.run(drive(bodies, concurrency, LOAD_TIMEOUT_S))
        after = settled(service.metrics_url, METRICS_SETTLE_S)
    finally:
        service.stop()
    rise = {k: {labels: v - before[k].get(labels, 0.0) for labels, v in after[k].items()} for k in after}
    hits, queries = sum(rise[HITS].values()), sum(rise[QUERIES].values())
    ok = load.ok
    return {"system": system, "sent": len(load.results), "ok": len(ok), "startup_s": startup_s,
            "wall_s": load.wall_s, "hit_rate": hits / queries if queries else float("nan"),
            "hit_tokens": hits, "query_tokens": queries,
            "queries_by_engine": sorted((v for v in rise[QUERIES].values() if v), reverse=True),
            "ttft_p50_ms": 1000 * load.ttft_p(0.5), "ttft_p99_ms": 1000 * load.ttft_p(0.99),
            "e2e_p50_ms": 1000 * _p([r.latency_s for r in ok], 0.5),
            "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / max(1, len(ok)),
            "statuses": {str(k): v for k, v in load.statuses().items()}}


def _p(values: list, q: float) -> float:
    from raylm.bench.load import percentile

    return percentile([v for v in values if v is not None], q)


def run_child(system: str, args: argparse.Namespace) -> dict | None:
    """Measure one system in a child process (its own Ray); its whole tree is ended after the timeout."""
    from harness import process_tree
    from raylm.serve.control.service import end_processes

    cmd = [sys.executable, __file__, "--child", system, "--requests", str(args.requests),
           "--concurrency", str(args.concurrency), "--cache-tokens", str(args.cache_tokens),
           "--prompts", str(args.prompts), "--ingress-replicas", str(args.ingress_replicas)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        out, _ = proc.communicate(timeout=args.system_timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{system}: no result within {args.system_timeout_s:.0f}s; ending its processes", file=sys.stderr)
        out = ""
    finally:
        if proc.poll() is None:
            tree = process_tree(proc.pid)
            proc.terminate()
            end_processes(tree, grace_s=30)
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{system}: no result; its output ended with:\n{out[-3000:]}", file=sys.stderr)
    return json.loads(line[7:]) if line else None


def report(rows: list[dict], args: argparse.Namespace) -> str:
    cache = f"{args.cache_tokens} tokens" if args.cache_tokens else "1 GiB"
    setup = (f"SmolLM2-135M, 2 replicas × 1 core, {args.ingress_replicas} ingress replica(s), "
             f"{args.prompts} system prompts × {PROMPT_TOKENS} tokens, "
             f"{args.requests} chat requests at c={args.concurrency}, {OUTPUT_TOKENS} output tokens, KV cache "
             f"{cache} per replica, {BLOCK_TOKENS}-token blocks; {time.strftime('%Y-%m-%d')}")
    header = ("| routing | ok/sent | prefix-cache hit rate | TTFT p50 | TTFT p99 | E2E p50 | wall | prompt tokens | "
              "queried tokens by replica |")
    lines = [setup, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = " / ".join(f"{v / 1000:.0f}k" for v in r["queries_by_engine"]) or "-"
        lines.append(f"| {r['system']} | {r['ok']}/{r['sent']} | {r['hit_rate']:.3f} | {r['ttft_p50_ms']:.0f} ms | "
                     f"{r['ttft_p99_ms']:.0f} ms | {r['e2e_p50_ms']:.0f} ms | {r['wall_s']:.0f} s | "
                     f"{r['prompt_tokens_mean']:.0f} | {split} |")
    base = next((r for r in rows if r["system"] == "default"), None)
    if base:
        lines.append("")
        for r in rows:
            if r is not base:
                lines.append(
                    f"- {r['system']} vs default: hit rate {r['hit_rate']:.3f} vs {base['hit_rate']:.3f} "
                    f"(target ≥ 0.9); TTFT p50 {r['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}× "
                    f"({100 * (1 - r['ttft_p50_ms'] / base['ttft_p50_ms']):+.0f}% lower; target ≥ 30%), "
                    f"p99 {r['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}×")
    by_system = {r["system"]: r for r in rows}
    text, kv = by_system.get("prefix"), by_system.get("kv")
    if text and kv:
        lines.append(f"- kv vs prefix (text hash): hit rate {kv['hit_rate']:.3f} vs {text['hit_rate']:.3f} "
                     f"({100 * (kv['hit_rate'] / text['hit_rate'] - 1):+.1f}%), TTFT p50 "
                     f"{kv['ttft_p50_ms'] / text['ttft_p50_ms']:.2f}×, "
                     f"p99 {kv['ttft_p99_ms'] / text['ttft_p99_ms']:.2f}×")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="default,prefix", help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cache-tokens", type=int, default=6144, help="KV cache per replica; 0: 1 GiB")
    parser.add_argument("--prompts", type=int, default=8, help="distinct system prompts (more: evictions)")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--system-timeout-s", type=float, default=540.0, help="per system, start to stop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="results as prefix_routing-<tag>.{md,json}")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.requests, args.concurrency, args.cache_tokens,
                                             args.prompts, args.ingress_replicas)), flush=True)
        return
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    rows = []
    for system in systems:
        started = time.monotonic()
        row = run_child(system, args)
        print(f"{system}: {'FAILED (see its output above)' if row is None else 'done'} in "
              f"{time.monotonic() - started:.0f}s", flush=True)
        if row is not None:
            rows.append(row)
    text = report(rows, args)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"prefix_routing-{args.tag}" if args.tag else "prefix_routing"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
