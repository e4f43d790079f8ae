"""Where the CPU goes while a server streams: CPU seconds per process group, per 1,000 output tokens.

    python benchmarks/cpu_breakdown.py URL SERVER_PID [--concurrency 16 --requests 64]

Reads every process under SERVER_PID (psutil) before and after one load point of `raylm bench`'s load,
groups them by role (Serve proxy, ingress, model replica, EngineCore, Ray's own, ...), and prints CPU
seconds per 1,000 output tokens for each group. Used to profile raylm against bare vLLM (BENCHMARKS.md).
"""

import argparse
import asyncio
from collections import Counter

import psutil

from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import SMOLLM2

ROLES = (("ProxyActor", "serve proxy"), ("ServeReplica:raylm:ingress", "raylm ingress"),
         ("ServeReplica:raylm:model", "raylm model replica"), ("OpenAiIngress", "ray-serve-llm ingress"),
         ("LLMServer", "ray-serve-llm model replica"), ("EngineCore", "vLLM EngineCore"),
         ("VLLM::Worker", "vLLM worker"), ("api_server", "vllm api server"), ("ServeController", "serve controller"),
         ("raylet", "ray system"), ("gcs_server", "ray system"), ("dashboard", "ray system"),
         ("log_monitor", "ray system"), ("monitor", "ray system"))


def role(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except psutil.Error:
        return "gone"
    return next((name for key, name in ROLES if key in text), "other")


def cpu(root: int) -> Counter:
    total: Counter = Counter()
    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    for proc in procs:
        try:
            t = proc.cpu_times()
            total[(proc.pid, role(proc))] = t.user + t.system
        except psutil.Error:
            pass
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("pid", type=int)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    prompts = synthetic(load_tokenizer(None, SMOLLM2), args.requests + 8, 100)
    asyncio.run(run_bench(BenchSpec(url=args.url, model=SMOLLM2, prompts=prompts[-8:], concurrency=[8],
                                    requests=8, warmup=0)))
    spec = BenchSpec(url=args.url, model=SMOLLM2, prompts=prompts, concurrency=[args.concurrency],
                     requests=args.requests, warmup=0)
    before = cpu(args.pid)
    (point, _), = asyncio.run(run_bench(spec))
    after = cpu(args.pid)
    by_role: Counter = Counter()
    for key, value in after.items():
        by_role[key[1]] += value - before.get(key, 0.0)
    tokens = point.output_tok_s * point.duration_s
    print(f"{tokens:.0f} tokens in {point.duration_s:.1f} s ({point.output_tok_s:.1f} tok/s); "
          f"CPU seconds per 1,000 tokens:")
    for name, seconds in by_role.most_common():
        print(f"  {name:28s} {1000 * seconds / tokens:6.2f}")
    print(f"  {'all':28s} {1000 * sum(by_role.values()) / tokens:6.2f}")
