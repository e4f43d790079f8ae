"""The serving path's own cost: a tiny model behind raylm and behind bare `vllm serve`, CPU per token by role.

    python benchmarks/dataplane.py [--systems raylm,vllm] [--concurrency 64,256] [--seconds 30] [--rounds 1]
    python benchmarks/dataplane.py --layout default --concurrency 1,64 --rounds 2   # each system's defaults
    RAYLM_BASE_SRC=../before/src python benchmarks/dataplane.py --systems raylm-base,raylm,vllm   # before/after

The model is the tests' tiny random Llama (2 layers, 128 wide), so the engine's compute is small and the
serving path dominates. Each system serves it with the same engine arguments (bf16, eager, 256 sequences
per step) and the engine's OpenMP threads on core 1 (`VLLM_CPU_OMP_THREADS_BIND=1`), so the serving path
has core 0 to itself. Load: streaming completions of 64 prompt tokens and 128 output tokens (ignore_eos),
a closed loop at each concurrency for `--seconds` (requests keep coming until then; the ones in flight
finish). During each point every process under the system's root is read before and after (psutil), and
its CPU is grouped by role (cpu_breakdown.py); the kernel's scheduler statistics say what share of the wall
the model's busy (OpenMP) threads spent on a core and runnable but waiting for one, and this process's own
CPU is the load generator's (it shares the cores), with how late its own event loop ran (p99: its queue
is in the latencies it measures). "Outside the worker" is everything but the process that
runs the model (vLLM's worker process; with raylm's CPU layout the worker runs inside EngineCore, which
then also schedules): API servers, proxies, ingress, EngineCore when separate, and every Ray process. "Serving
path" leaves out EngineCore and the worker both, so it compares layouts fairly. Rounds alternate the order
of the systems. `--layout default` serves it instead as a user would get it from each system (issue 26's
setting): OpenMP threads on every core, each system's own batch size, engine layout and (raylm) admission;
`--raylm-model` changes raylm's model config for a what-if. A traced system (`raylm-traced`: raylm's defaults
with its and vLLM's traces to a receiver in this process) also gets its first tokens split by phase, from each
request's trace: the ingress (auth, body, Serve's routing), the replica (prepare, admission), the engine (vLLM's
own queue and prefill), the relay back, and the client's TTFT beside the edge's. Traces cost CPU (docs/usage.md):
compare a traced system's tok/s with an untraced one's, not with a peer's.
Results: benchmarks/results/dataplane.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from harness import HERE, TRACED, Setup, cpu_flags, receiver, running

from cpu_breakdown import ENGINE_CORE, WORKER, busy_thread_shares, cpu_by_role, engine_threads
from helpers import TINY_ENGINE_ARGS, make_tiny_llama
from raylm.bench.prompts import synthetic
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import default_cache_dir
from raylm.serve.tracing import GEN_AI_SERVER_TIME_TO_FIRST_TOKEN as TTFT_ATTR

NAME = "tiny"
INPUT_TOKENS, OUTPUT_TOKENS = 64, 128
ENGINE_ARGS = {**TINY_ENGINE_ARGS, "dtype": "bfloat16", "max_num_seqs": 256}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
# raylm runs every request the engine can batch (the peer has no admission limit).
# On a one-core binding raylm would keep vLLM's `mp` layout (its tail latency under mixed load is better:
# docs/serve.md); here the engine has core 1 to itself, so raylm is told to take its `uni` layout, as
# `vllm-uni` does for bare vLLM.
RAYLM_MODEL = {"num_cpus": 0.5, "admission": {"max_running": 256, "max_queued": 256, "burst": 0},
               "engine_args": {**ENGINE_ARGS, "distributed_executor_backend": "uni"}}


# --layout default: what a user gets from each system's own defaults, as issue 26 tried it from outside. Both
# engines' OpenMP threads on every core, vLLM's batch size, raylm's admission and engine layout as shipped.
DEFAULT_ENGINE_ARGS = {**TINY_ENGINE_ARGS, "dtype": "bfloat16"}
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 2) - 1}"}


def measure(url: str, pid: int, prompts: list[str], concurrency: int, seconds: float) -> dict:
    spec = BenchSpec(url=url, model=NAME, prompts=prompts, output_tokens=OUTPUT_TOKENS, concurrency=[concurrency],
                     requests=10**6, duration_s=seconds, warmup=0, timeout_s=600)
    before, threads, client, start = cpu_by_role(pid), engine_threads(pid), time.process_time(), time.monotonic()
    (point, _), = asyncio.run(run_bench(spec))
    used = cpu_by_role(pid) - before
    wall = time.monotonic() - start
    on_core, waiting = busy_thread_shares(threads, engine_threads(pid), wall)
    tokens = point.output_tok_s * point.duration_s
    per_token = {role: 1000 * s / tokens for role, s in used.most_common()}
    # The process that runs the model: the worker, or EngineCore when the worker runs inside it (raylm).
    model_process = WORKER if WORKER in per_token else ENGINE_CORE
    return {"tok_s": point.output_tok_s, "ok": point.ok, "requests": point.requests,
            "ttft_p50_ms": 1000 * point.ttft_s["p50"], "ttft_p99_ms": 1000 * point.ttft_s["p99"],
            "tpot_p50_ms": 1000 * point.tpot_s["p50"], "cpu_ms_per_token": per_token,
            "outside_worker_ms": sum(v for r, v in per_token.items() if r != model_process),
            "serving_path_ms": sum(v for r, v in per_token.items() if r not in (WORKER, ENGINE_CORE)),
            "cores_busy": sum(used.values()) / point.duration_s,
            # The engine's OpenMP threads: share of the wall on a core, and runnable but waiting for one.
            "engine_on_core": on_core, "engine_waiting": waiting,
            "load_cores": (time.process_time() - client) / wall,  # this process: the load generator
            "client_lag_p99_ms": 1000 * (point.client_lag_p99_s or 0.0)}  # ...and how late its loop ran


# A first token's way, phase by phase (ms), from one request's spans (serve/edge/spans.py, replica/spans.py):
# (name, how to get it from the trace's spans by name and the root span).
PHASES = (
    ("the edge's TTFT (request in → first byte out)", lambda s, r: 1000 * r.attributes[TTFT_ATTR]),
    ("ingress: auth, body (and quota)", lambda s, r: (s["forward"].start_ns - r.start_ns) / 1e6),
    ("ingress → the replica's handler (Serve's routing, the hand-off)",
     lambda s, r: (s["replica"].start_ns - s["route"].start_ns) / 1e6),
    ("replica: prepare (parse, count)", lambda s, r: s["prepare"].duration_ms),
    ("replica: admission wait", lambda s, r: s["admission wait"].duration_ms),
    ("engine: to its first token (raylm's view)", lambda s, r: s["prefill"].duration_ms),
    ("  vLLM: queue", lambda s, r: 1000 * s["llm_request"].attributes["gen_ai.latency.time_in_queue"]),
    ("  vLLM: prefill", lambda s, r: 1000 * s["llm_request"].attributes["gen_ai.latency.time_in_model_prefill"]),
    ("  vLLM: its time to first token", lambda s, r: 1000 * s["llm_request"].attributes[
        "gen_ai.latency.time_to_first_token"]),
    ("first token → the edge (stream claim, relay)",
     lambda s, r: (r.start_ns + 1e9 * r.attributes[TTFT_ATTR] - s["prefill"].end_ns) / 1e6),
)


def ttft_split(since_ns: int, answered: int) -> dict:
    """Each phase's p50 and mean over the streams of the traces that began after `since_ns` (waits up to 15 s
    for the `answered` streams' traces to arrive), and how many traces had every phase."""
    deadline = time.monotonic() + 15
    while True:
        found: dict[str, dict[str, object]] = {}
        for span in receiver().spans():
            if span.start_ns >= since_ns:
                found.setdefault(span.trace_id, {})[span.name] = span
        whole = [t for t in found.values() if all(k in t for k in ("forward", "route", "replica", "prepare",
                                                                     "admission wait", "prefill", "llm_request"))
                 and any(n.startswith("POST ") and TTFT_ATTR in t[n].attributes for n in t)]
        if len(whole) >= answered or time.monotonic() > deadline:
            break
        time.sleep(1)
    values: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    for trace in whole:
        root = next(v for k, v in trace.items() if k.startswith("POST "))
        for name, get in PHASES:
            values[name].append(get(trace, root))
    return {"traces": len(whole), "phases": {name: {"p50": statistics.median(v), "mean": statistics.fmean(v)}
                                             for name, v in values.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="raylm,vllm,vllm-uni")
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--layout", choices=["pinned", "default"], default="pinned",
                        help="pinned: the engine on core 1, 256 sequences for everyone (above); default: each "
                             "system's defaults, OpenMP threads on every core")
    parser.add_argument("--raylm-model", default="{}", help="JSON merged into raylm's model config (e.g. "
                                                           "'{\"admission\": {\"max_running\": 128}}')")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    systems, levels = args.systems.split(","), [int(c) for c in args.concurrency.split(",")]
    model_dir = make_tiny_llama(default_cache_dir() / "models" / "tiny-llama-bench")
    from transformers import AutoTokenizer

    prompts = synthetic(AutoTokenizer.from_pretrained(model_dir), 4000, INPUT_TOKENS)
    setup = (Setup(str(model_dir), NAME, ENGINE_ARGS, ENV, {**RAYLM_MODEL, **json.loads(args.raylm_model)})
             if args.layout == "pinned" else
             Setup(str(model_dir), NAME, DEFAULT_ENGINE_ARGS, DEFAULT_ENV, json.loads(args.raylm_model)))
    rows: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="raylm-dataplane-") as tmp:
        for r in range(args.rounds):
            for system in systems if r % 2 == 0 else systems[::-1]:
                with running(system, setup, Path(tmp)) as (url, pid):
                    asyncio.run(run_bench(BenchSpec(url=url, model=NAME, prompts=prompts, concurrency=[16],
                                                    output_tokens=OUTPUT_TOKENS, requests=32, warmup=0)))
                    time.sleep(2)
                    row = {"round": r + 1}
                    for c in levels:
                        since = time.time_ns()
                        row[f"c{c}"] = measure(url, pid, prompts, c, args.seconds)
                        if system in TRACED:
                            row[f"c{c}"]["ttft_split"] = ttft_split(since, row[f"c{c}"]["ok"])
                rows[system].append(row)
                for c in levels:
                    m = row[f"c{c}"]
                    print(f"round {r + 1} {system:10s} c={c}: {m['tok_s']:7.1f} tok/s, TTFT p50/p99 "
                          f"{m['ttft_p50_ms']:.0f}/{m['ttft_p99_ms']:.0f} ms, outside the worker "
                          f"{m['outside_worker_ms']:.3f} ms/token, {m['ok']}/{m['requests']} ok", flush=True)
    report(rows, levels, args.out)


def report(rows: dict[str, list[dict]], levels: list[int], out: Path) -> None:
    def med(system: str, c: int, key: str) -> float:
        return statistics.median(row[f"c{c}"][key] for row in rows[system])

    lines = [f"CPU flags: {cpu_flags()}; date {time.strftime('%Y-%m-%d')}", "",
             "| system | c | tok/s | TTFT p50 | TTFT p99 | TPOT p50 | CPU ms/token outside the worker | "
             "serving path ms/token | cores busy | engine threads on a core / waiting | load generator cores | "
             "its loop's lag p99 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for system in rows:
        for c in levels:
            lines.append(f"| {system} | {c} | {med(system, c, 'tok_s'):.1f} | {med(system, c, 'ttft_p50_ms'):.0f} ms | "
                         f"{med(system, c, 'ttft_p99_ms'):.0f} ms | {med(system, c, 'tpot_p50_ms'):.1f} ms | "
                         f"{med(system, c, 'outside_worker_ms'):.3f} | {med(system, c, 'serving_path_ms'):.3f} | "
                         f"{med(system, c, 'cores_busy'):.2f} | {med(system, c, 'engine_on_core'):.2f} / "
                         f"{med(system, c, 'engine_waiting'):.2f} | {med(system, c, 'load_cores'):.2f} | "
                         f"{med(system, c, 'client_lag_p99_ms'):.0f} ms |")
    lines += ["", "CPU ms per output token by role (median of rounds):", ""]
    for system in rows:
        for c in levels:
            per_round = [row[f"c{c}"]["cpu_ms_per_token"] for row in rows[system]]
            roles = Counter({role: statistics.median(r.get(role, 0.0) for r in per_round)
                             for role in set().union(*per_round)})
            lines.append(f"- {system} c={c}: " + ", ".join(f"{role} {v:.3f}" for role, v in roles.most_common()))
    for system in (s for s in rows if s in TRACED):
        for c in levels:
            splits = [row[f"c{c}"]["ttft_split"] for row in rows[system]]
            lines += ["", f"{system} c={c}: each first token's way, ms, median of rounds of each phase's p50 and mean "
                      f"over the round's traces ({'/'.join(str(x['traces']) for x in splits)} traces); client TTFT p50 "
                      f"{med(system, c, 'ttft_p50_ms'):.0f} ms", "", "| phase | p50 | mean |", "|---|---|---|"]
            for name, _ in PHASES:
                got = [x["phases"][name] for x in splits if name in x["phases"]]
                if got:
                    lines.append(f"| {name} | {statistics.median(g['p50'] for g in got):.1f} | "
                                 f"{statistics.median(g['mean'] for g in got):.1f} |")
    if "raylm" in rows:
        lines.append("")
        for c in levels:
            for peer in (p for p in rows if p.startswith("vllm")):
                lines.append(f"- c={c}: raylm / {peer} tok/s **{med('raylm', c, 'tok_s') / med(peer, c, 'tok_s'):.2f}×**"
                             " (target ≥ 0.95× vllm)")
            lines.append(f"- c={c}: raylm outside the worker {med('raylm', c, 'outside_worker_ms'):.3f} ms/token "
                         "(target ≤ 0.4)")
            if "raylm-base" in rows:
                lines.append(f"- c={c}: raylm / raylm-base tok/s "
                             f"**{med('raylm', c, 'tok_s') / med('raylm-base', c, 'tok_s'):.2f}×**, serving path "
                             f"{med('raylm', c, 'serving_path_ms'):.3f} vs {med('raylm-base', c, 'serving_path_ms'):.3f} "
                             "ms/token")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane.md").write_text(text)
    (out / "dataplane.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
