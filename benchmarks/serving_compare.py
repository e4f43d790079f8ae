"""raylm serve beside its peers: same model, same machine, same load, interleaved rounds, printed ratios.

    python benchmarks/serving_compare.py [--rounds 2] [--systems raylm,vllm,vllm-uni,ray-serve-llm,...]

Systems (harness.py; each started in turn as its own process tree, then stopped; only what was started):
    raylm                 `raylm serve` with the bundled SmolLM2-135M alone (its defaults)
    vllm                  bare `vllm serve`, same engine arguments
    vllm-uni              bare `vllm serve` with raylm's CPU engine layout (the worker inside EngineCore),
                          to tell the layout's gain from the serving path's
    ray-serve-llm         Ray Serve LLM (ray.serve.llm.build_openai_app), Serve's throughput-optimized mode
    ray-serve-llm-direct  the same with its direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1, HAProxy)
    naive                 the seed's naive deployment: a transformers pipeline per request on Serve
Every engine: bf16 where the CPU has it (else float32), eager, max_model_len 4096, KV cache 2 GiB, OpenMP
threads bound to every core (VLLM_CPU_OMP_THREADS_BIND=0-N: 219 vs 187 tok/s for bare vllm at c=16 against
one core, BENCHMARKS.md).

Load per system and round: streaming completions of ~100 prompt tokens and 64 output tokens (ignore_eos),
at concurrency 1 (16 requests) and 16 (64 requests), after 8 warmup requests (the naive deployment: half
as many requests; it takes ~4 s per request alone). Rounds run the systems in
alternating order (A B C D, then D C B A) so drift of the machine cancels; figures are medians of rounds.
Results: benchmarks/results/serving_compare.{json,md} and serving_compare.png.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV, Setup, arguments, cpu_flags, running

from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.bench.report import Point
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import SMOLLM2, default_cache_dir, resolve_source

POINTS = {1: 16, 16: 64}  # concurrency: requests
INPUT_TOKENS, OUTPUT_TOKENS, WARMUP = 100, 64, 8


def measure(url: str, prompts: list[str], slow: bool = False) -> dict[int, Point]:
    out = {}
    offset = 0
    for c, n in POINTS.items():
        n = n // 2 if slow else n  # the naive deployment: ~40 s per request at c=16
        spec = BenchSpec(url=url, model=SMOLLM2, prompts=prompts[offset:], output_tokens=OUTPUT_TOKENS,
                         concurrency=[c], requests=n, warmup=WARMUP if not out else 0, duration_s=600)
        offset += n + spec.warmup
        (point, _), = asyncio.run(run_bench(spec))
        out[c] = point
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--systems", default="raylm,vllm,vllm-uni,ray-serve-llm,ray-serve-llm-direct,naive")
    args = parser.parse_args()
    systems = args.systems.split(",")
    setup = Setup(resolve_source(f"bundled:{SMOLLM2}", default_cache_dir()), SMOLLM2, SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV)
    tokenizer = load_tokenizer(None, SMOLLM2)
    figures: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="raylm-compare-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            order = systems if r % 2 == 0 else systems[::-1]
            for system in order:
                prompts = synthetic(tokenizer, 200, INPUT_TOKENS, seed=r)  # same prompts for every system
                started = time.monotonic()
                try:
                    with running(system, setup, work) as (url, _):
                        up_s = time.monotonic() - started
                        points = measure(url, prompts, slow=system == "naive")
                except Exception as exc:
                    print(f"round {r + 1} {system}: FAILED {exc}", flush=True)
                    print((work / f"{system}.log").read_text()[-3000:], file=sys.stderr)
                    continue
                row = {"round": r + 1, "startup_s": up_s, **{f"c{c}": vars(p) for c, p in points.items()}}
                figures[system].append(row)
                print(f"round {r + 1} {system:14s} c=1: {points[1].output_tok_s:6.1f} tok/s, TTFT p50 "
                      f"{1000 * points[1].ttft_s['p50']:6.1f} ms | c=16: {points[16].output_tok_s:6.1f} tok/s, "
                      f"TTFT p50 {1000 * points[16].ttft_s['p50']:7.1f} ms, ITL p50 "
                      f"{1000 * (points[16].itl_s['p50'] or 0):5.1f} ms | errors "
                      f"{sum(p.requests - p.ok for p in points.values())}", flush=True)
    report(figures, args.out)


def _median(rows: list[dict], c: int, key: str, q: str | None = None) -> float:
    values = [row[f"c{c}"][key][q] if q else row[f"c{c}"][key] for row in rows]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def report(figures: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {s: {"rounds": len(rows), "tok_s_c16": _median(rows, 16, "output_tok_s"),
                   "tok_s_c1": _median(rows, 1, "output_tok_s"), "ttft_p50_ms_c1": 1000 * _median(rows, 1, "ttft_s", "p50"),
                   "ttft_p50_ms_c16": 1000 * _median(rows, 16, "ttft_s", "p50"),
                   "itl_p50_ms_c16": 1000 * _median(rows, 16, "itl_s", "p50"),
                   "tpot_p50_ms_c16": 1000 * _median(rows, 16, "tpot_s", "p50"),
                   "e2e_p99_ms_c16": 1000 * _median(rows, 16, "e2e_s", "p99"),
                   "startup_s": statistics.median(r["startup_s"] for r in rows) if rows else float("nan")}
               for s, rows in figures.items()}
    lines = [f"CPU flags: {cpu_flags()}; {time.strftime('%Y-%m-%d')}", "",
             "| system | tok/s c=1 | tok/s c=16 | TTFT p50 c=1 | TTFT p50 c=16 | ITL p50 c=16 | TPOT p50 c=16 | "
             "E2E p99 c=16 | start |", "|---|---|---|---|---|---|---|---|---|"]
    for s, f in summary.items():
        lines.append(f"| {s} | {f['tok_s_c1']:.1f} | {f['tok_s_c16']:.1f} | {f['ttft_p50_ms_c1']:.1f} ms | "
                     f"{f['ttft_p50_ms_c16']:.1f} ms | {f['itl_p50_ms_c16']:.1f} ms | {f['tpot_p50_ms_c16']:.1f} ms | "
                     f"{f['e2e_p99_ms_c16']:.0f} ms | "
                     f"{f['startup_s']:.0f} s |")
    ours = next((s for s in summary if s.startswith("raylm")), None)
    if ours:
        lines.append("")
        for peer, target in (("vllm", 1.0), ("vllm-uni", 1.0), ("ray-serve-llm", 1.5),
                             ("ray-serve-llm-direct", 1.5), ("naive", 10.0)):
            if peer in summary:
                ratio = summary[ours]["tok_s_c16"] / summary[peer]["tok_s_c16"]
                lines.append(f"- tok/s at c=16, {ours} / {peer}: **{ratio:.2f}×** (target ≥ {target}×)")
        if "vllm" in summary:
            delta = summary[ours]["ttft_p50_ms_c1"] - summary["vllm"]["ttft_p50_ms_c1"]
            lines.append(f"- TTFT p50 at c=1, {ours} − vllm: **{delta:+.1f} ms** (target ≤ +5 ms)")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out / "serving_compare.md").write_text(text)
    (out / "serving_compare.json").write_text(json.dumps({"summary": summary, "rounds": figures}, indent=2))
    plot(summary, out / "serving_compare.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [summary[n]["tok_s_c16"] for n in names])
    left.set(ylabel="output tokens/s", title="Throughput at concurrency 16")
    right.bar(names, [summary[n]["ttft_p50_ms_c1"] for n in names])
    right.set(ylabel="ms", yscale="log", title="TTFT p50 at concurrency 1")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
