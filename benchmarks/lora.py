"""LoRA adapters: their cost beside base-only traffic, raylm against Ray Serve LLM's multiplexed LoRA, and
adapter loads under skewed traffic with raylm's routing against Serve's default.

    python benchmarks/lora.py [--parts throughput,zipf] [--requests 96] [--out benchmarks/results]

Adapters: 8 PEFT LoRA adapters of the bundled SmolLM2-135M (rank 8, every linear layer, seeded, non-zero),
made in a temporary folder. Engines: the dtype raylm picks on this CPU, eager, max_model_len 2048, KV cache
2 GiB, max_loras 8, max_lora_rank 8, max_num_seqs 40.

throughput  One replica (OpenMP threads on every core). Streaming completions of ~100 prompt tokens and 48
            output tokens (ignore_eos), `--requests` at c=16, after a warm-up request per adapter (loading
            is measured apart, in zipf). Per system: base-only traffic, then the same requests spread
            round-robin over the 8 adapters, on the same replica.
              raylm          adapters in its config (`adapters:`), requests name the adapter
              ray-serve-llm  Ray Serve LLM with `lora_config.dynamic_lora_loading_path` (it takes cloud storage
                             only: a local S3, moto's server on 127.0.0.1, holds the same adapter files),
                             requests name `smollm2-135m-instruct:<adapter>`, Serve's multiplexing; vLLM as
                             shipped (VLLM_PLUGINS="": without raylm's fix of vLLM's CPU LoRA ops)
            Ratios: adapters / base-only per system; raylm / Ray Serve LLM on adapter traffic.
zipf        Two replicas × 1 core (one OpenMP thread each), max_loras 2, max_cpu_loras 2, 8 adapters,
            `--requests` × 2 streaming requests at c=8, 16 output tokens, adapters drawn Zipf(s=1.1) (seeded,
            the same sequence for each system). Adapter loads (a request for an adapter its replica did not
            hold among its 2 most recent: raylm's per-replica count, /status) per 1,000 requests, TTFT.
              raylm          raylm's router: a replica that holds the adapter unless its queue is much longer
              raylm-pow2     Serve's default PowerOfTwoChoicesRequestRouter (harness.py)
Results: benchmarks/results/lora.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import HERE, SMOLLM2_ENV, Setup, cpu_flags, free_port, running

from raylm import hardware
from raylm.bench.load import closed_loop, completion_body, send
from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.models import SMOLLM2, default_cache_dir, resolve_source

RESULTS = HERE / "results"
ADAPTERS, RANK = 8, 8
INPUT_TOKENS = 100
BUCKET = "raylm-bench-loras"


def make_adapters(base: str, folder: Path) -> dict[str, str]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import make_lora

    return {f"a{i}": str(make_lora(Path(base), folder / f"a{i}", seed=i, rank=RANK)) for i in range(ADAPTERS)}


def local_s3(adapters: dict[str, str], work: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 holding the adapters under s3://BUCKET/<name>/; the env to reach it."""
    import boto3

    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "wb"), stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                      aws_secret_access_key="bench", region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for name, folder in adapters.items():
        for file in Path(folder).iterdir():
            s3.upload_file(str(file), BUCKET, f"{name}/{file.name}")
    return proc, env


async def drive(url: str, bodies: list[dict], concurrency: int, timeout_s: float = 900):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return await closed_loop(lambda i: send(client, f"{url}/completions", bodies[i]), concurrency,
                                 len(bodies), timeout_s)


def summary(load) -> dict:
    ok = load.ok
    return {"sent": len(load.results), "ok": len(ok), "tok_s": load.output_tok_s,
            "ttft_p50_ms": 1000 * load.ttft_p(0.5), "ttft_p99_ms": 1000 * load.ttft_p(0.99),
            "statuses": {str(k): v for k, v in load.statuses().items()}}


def throughput(model_dir: str, adapters: dict[str, str], requests: int, work: Path) -> list[dict]:
    dtype = hardware.fit({}, {}).engine_args["dtype"]
    args = {"dtype": dtype, "max_model_len": 2048, "enforce_eager": True, "max_num_seqs": 40}
    lora = {"enable_lora": True, "max_loras": ADAPTERS, "max_lora_rank": RANK, "max_cpu_loras": ADAPTERS}
    env = dict(SMOLLM2_ENV)
    prompts = synthetic(load_tokenizer(None, SMOLLM2), requests, INPUT_TOKENS, seed=0)
    moto, s3_env = local_s3(adapters, work)
    os.environ.update(s3_env)  # Ray Serve LLM's processes read the adapters from there
    rows = []
    try:
        for system, setup, prefix in (
            ("raylm", Setup(model_dir, SMOLLM2, args, env, raylm_model={
                "adapters": adapters, "lora": {"max_loras": ADAPTERS, "max_lora_rank": RANK,
                                               "max_cpu_loras": ADAPTERS}}), ""),
            # As shipped: without raylm's vLLM plugin (engine/vllm_fixes.py), which this environment installs.
            ("ray-serve-llm", Setup(model_dir, SMOLLM2, {**args, **lora}, {**env, **s3_env, "VLLM_PLUGINS": ""},
                                    ray_llm_lora={
                "dynamic_lora_loading_path": f"s3://{BUCKET}", "max_num_adapters_per_replica": ADAPTERS}),
             f"{SMOLLM2}:"),
        ):
            with running(system, setup, work) as (url, _):
                names = [prefix + a for a in adapters]
                warm = [completion_body(n, "warm up", 4) for n in names] + [completion_body(SMOLLM2, "warm up", 4)]
                asyncio.run(drive(url, warm, 1))
                for traffic, model in (("base", lambda i: SMOLLM2), ("adapters", lambda i: names[i % len(names)])):
                    bodies = [completion_body(model(i), prompts[i], 48) for i in range(requests)]
                    rows.append({"part": "throughput", "system": system, "traffic": traffic,
                                 **summary(asyncio.run(drive(url, bodies, 16)))})
                    print(rows[-1], flush=True)
    finally:
        moto.terminate()
    return rows


def zipf_sequence(n: int, s: float = 1.1, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(ADAPTERS)]
    return rng.choices(range(ADAPTERS), weights, k=n)


def zipf(model_dir: str, adapters: dict[str, str], requests: int, work: Path) -> list[dict]:
    args = {"max_model_len": 2048, "enforce_eager": True}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    extra = {"replicas": 2, "num_cpus": 0.9, "adapters": adapters,  # two and the ingress fit 2 CPUs
             "lora": {"max_loras": 2, "max_lora_rank": RANK, "max_cpu_loras": 2}}
    n = 2 * requests
    sequence = zipf_sequence(n)
    prompts = synthetic(load_tokenizer(None, SMOLLM2), n, 32, seed=1)
    names = list(adapters)
    bodies = [completion_body(names[a], prompts[i], 16) for i, a in enumerate(sequence)]
    rows = []
    for system in ("raylm", "raylm-pow2"):
        with running(system, Setup(model_dir, SMOLLM2, args, env, raylm_model=extra), work) as (url, _):
            root = url.removesuffix("/v1")
            before = loads(root)
            load = asyncio.run(drive(url, bodies, 8))
            time.sleep(3)  # each replica publishes its figures every second
            after = loads(root)
        rows.append({"part": "zipf", "system": system, **summary(load), "adapter_loads": after - before,
                     "loads_per_1000": 1000 * (after - before) / max(1, len(load.ok)),
                     "share_of_top_adapter": sequence.count(0) / n})
        print(rows[-1], flush=True)
    return rows


def loads(root: str) -> int:
    status = httpx.get(f"{root}/status", timeout=30).json()
    return status["models"][SMOLLM2]["adapter_loads"]


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{time.strftime('%Y-%m-%d')}, CPU flags: {cpu_flags()}, {os.cpu_count()} cores", ""]
    by = {(r["part"], r["system"], r.get("traffic")): r for r in rows}
    if any(r["part"] == "throughput" for r in rows):
        lines += [f"Throughput: one replica, {args.requests} streaming completions at c=16, 48 output tokens",
                  "", "| system | traffic | ok/sent | output tok/s | TTFT p50 | TTFT p99 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['traffic']} | {r['ok']}/{r['sent']} | {r['tok_s']:.1f} | "
                  f"{r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms |" for r in rows if r["part"] == "throughput"]
        lines.append("")
        for system in ("raylm", "ray-serve-llm"):
            base, lora = by.get(("throughput", system, "base")), by.get(("throughput", system, "adapters"))
            if base and lora:
                lines.append(f"- {system}: adapters / base-only throughput {lora['tok_s'] / base['tok_s']:.2f}× "
                             f"(target ≥ 0.8 for raylm), TTFT p50 {lora['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}×")
        ours, theirs = by.get(("throughput", "raylm", "adapters")), by.get(("throughput", "ray-serve-llm", "adapters"))
        if ours and theirs:
            lines.append(f"- raylm / Ray Serve LLM on adapter traffic: {ours['tok_s'] / theirs['tok_s']:.2f}× "
                         f"throughput (target ≥ 1.2), TTFT p50 {ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}×")
        lines.append("")
    if any(r["part"] == "zipf" for r in rows):
        lines += [f"Zipf: 2 replicas × 1 core, max_cpu_loras 2, {ADAPTERS} adapters, {2 * args.requests} requests "
                  "at c=8, 16 output tokens", "",
                  "| routing | ok/sent | adapter loads / 1,000 requests | TTFT p50 | TTFT p99 | output tok/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['ok']}/{r['sent']} | {r['loads_per_1000']:.0f} | {r['ttft_p50_ms']:.0f} ms | "
                  f"{r['ttft_p99_ms']:.0f} ms | {r['tok_s']:.1f} |" for r in rows if r["part"] == "zipf"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="throughput,zipf")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model_dir = resolve_source(f"bundled:{SMOLLM2}", default_cache_dir())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="raylm-lora-") as tmp:
        work = Path(tmp)
        adapters = make_adapters(model_dir, work / "adapters")
        for part in args.parts.split(","):
            rows += {"throughput": throughput, "zipf": zipf}[part](model_dir, adapters, args.requests, work)
    text = report(rows, args)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.md").write_text(text)
    (args.out / "lora.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
