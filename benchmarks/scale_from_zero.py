"""Scale from zero: SmolLM2 at `min_replicas: 0`, the first requests after each scale-down, N cycles.

    python benchmarks/scale_from_zero.py [--cycles 10] [--burst 4] [--systems raylm,raylm-cold]

Each system (harness.py: raylm = the defaults, a warm worker kept and EngineCore from a forkserver;
raylm-cold = neither, as before issue 26's warm workers; raylm-spawn, raylm-fork) serves SmolLM2 (bf16 where
the CPU has it, else float32; eager, KV cache 2 GiB) with autoscaling 0..1 and a 5 s downscale delay. A cycle
waits (≤ 180 s) until `/status` shows no replica, then sends `--burst` streaming completions at once (16 output
tokens) and records each one's status and time to its first token. Printed per system: the first token of each
cycle's first request, p50 and p99 over the cycles, every request's status (all must be 200: nothing may fail
while the replica starts), how long the scale-down itself took, and each replica's start as Serve's controller
logs it (from its decision to start the replica to the replica up: "started successfully ... after Xs").
Results: benchmarks/results/scale_from_zero.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import HERE, SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV, Setup, cpu_flags, running

from raylm.bench.load import completion_body, send
from raylm.models import SMOLLM2, default_cache_dir, resolve_source

RESULTS = HERE / "results"
AUTOSCALING = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 5, "upscale_delay_s": 0}


def replicas(base: str) -> int:
    body = httpx.get(f"{base}/status", timeout=30).json()
    return sum(body["models"][SMOLLM2]["replicas"].values())


def wait_for_zero(base: str, timeout_s: float = 180) -> float:
    start = time.monotonic()
    while replicas(base) > 0:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"still a replica after {timeout_s}s")
        time.sleep(0.5)
    return time.monotonic() - start


async def burst(url: str, n: int) -> list:
    async with httpx.AsyncClient(timeout=300) as client:
        body = completion_body(SMOLLM2, "Tell me about the sea.", 16)
        return await asyncio.gather(*(send(client, f"{url}/completions", body, {}) for _ in range(n)))


def replica_starts(name: str) -> list[float]:
    """Serve's own figure for each replica of the model it started in the newest Ray session: from the
    controller's decision to the replica up."""
    found = []
    for log in sorted(Path(tempfile.gettempdir(), "ray", "session_latest", "logs", "serve").glob("controller_*.log")):
        found += [float(s) for s in re.findall(rf"deployment='model-{re.escape(name)}'.*?started successfully "
                                               r"on node '\w+' after ([\d.]+)s", log.read_text(errors="replace"))]
    return found


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--systems", default="raylm,raylm-cold")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup = Setup(resolve_source(f"bundled:{SMOLLM2}", default_cache_dir()), SMOLLM2, SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV,
                  raylm_model={"autoscaling": AUTOSCALING})
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="raylm-zero-") as tmp:
        for system in args.systems.split(","):
            cycles = results.setdefault(system, [])
            with running(system, setup, Path(tmp)) as (url, _):
                base = url.removesuffix("/v1")
                for i in range(args.cycles):
                    down_s = wait_for_zero(base)
                    sent = asyncio.run(burst(url, args.burst))
                    ttfts = [r.ttft_s for r in sent if r.ttft_s is not None]
                    row = {"cycle": i + 1, "scale_down_s": down_s, "statuses": [r.status for r in sent],
                           "first_token_s": min(ttfts) if ttfts else None, "ttft_s": ttfts,
                           "errors": [r.error for r in sent if r.error]}
                    cycles.append(row)
                    print(f"{system} cycle {i + 1}: first token {row['first_token_s']:.1f}s, statuses "
                          f"{row['statuses']}, scale-down {down_s:.1f}s", flush=True)
                starts = replica_starts(SMOLLM2)
                cycles.append({"replica_starts_s": starts})
                print(f"{system}: replica starts (Serve's decision to up) {starts}", flush=True)
    report(results, args)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "cycles": args.cycles, "burst": args.burst}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_from_zero.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Scale from zero ({meta['date']}, CPU flags: {meta['cpu_flags']}, {meta['cores']} cores)", "",
             f"SmolLM2, min_replicas 0, {args.cycles} cycles of {args.burst} streams sent at once to a model "
             "at zero replicas.", "",
             "| system | first token p50 s | p99 s | max s | requests | not 200 | cycles (s) |",
             "|---|---|---|---|---|---|---|"]
    starts = {}
    for system, cycles in results.items():
        firsts = [c["first_token_s"] for c in cycles if c.get("first_token_s") is not None]
        statuses = [s for c in cycles for s in c.get("statuses", ())]
        starts[system] = [s for c in cycles for s in c.get("replica_starts_s", ())]
        if not firsts:
            continue
        lines.append(f"| {system} | {percentile(firsts, 50):.1f} | {percentile(firsts, 99):.1f} | {max(firsts):.1f} "
                     f"| {len(statuses)} | {sum(s != 200 for s in statuses)} | "
                     f"{', '.join(f'{f:.1f}' for f in firsts)} |")
    lines += ["", "Each replica's start, from Serve's decision to the replica up (the controller's log):", "",
              "| system | p50 s | max s | starts (s) |", "|---|---|---|---|"]
    lines += [f"| {system} | {percentile(v, 50):.1f} | {max(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |"
              for system, v in starts.items() if v]
    (args.out / "scale_from_zero.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
