"""Admission's batch on a CPU: raylm's default (32 running + 8 burst) against vLLM's CPU batch (120 + 8), with
one tenant flooding and another sending a few streams: what each costs a first token, each stream's speed and
the light tenant (issue 26, item 5: the default batch, docs/serve.md).

    python benchmarks/admission_batch.py [--rounds 2] [--flood 64] [--light 4] [--seconds 60]

The bundled SmolLM2-135M (as serving_compare.py runs it), `raylm serve` with two API keys: tenant `flood` keeps
`--flood` streams open, tenant `light` `--light`, for `--seconds` at once (closed loops, streaming completions of
~100 prompt tokens and 64 output tokens). Systems, alternating by round:
    default   raylm's admission as shipped on a CPU (max_running 32, burst 8: vLLM's max_num_seqs 40)
    vllm128   max_running 120, burst 8: bare `vllm serve`'s batch on a CPU (max_num_seqs 128)
Results: benchmarks/results/admission_batch.{md,json}.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV, Setup, arguments, cpu_flags, running

from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import SMOLLM2, default_cache_dir, resolve_source

INPUT_TOKENS, OUTPUT_TOKENS = 100, 64
KEYS = {"flood": "bench-flood-key", "light": "bench-light-key"}
SYSTEMS = {"default": {}, "vllm128": {"admission": {"max_running": 120, "burst": 8}}}
FIGURES = (("tok/s", "output_tok_s", None, 1), ("answered", "ok", None, 1), ("not answered", "refused", None, 1),
           ("TTFT p50 ms", "ttft_s", "p50", 1000), ("TTFT p99 ms", "ttft_s", "p99", 1000),
           ("TPOT p50 ms", "tpot_s", "p50", 1000))


async def load(url: str, prompts: list[str], flood: int, light: int, seconds: float) -> dict[str, dict]:
    """Both tenants at once, each its own closed loop; each tenant's point."""
    specs = {tenant: BenchSpec(url=url, model=SMOLLM2, prompts=prompts[i::2], output_tokens=OUTPUT_TOKENS,
                               concurrency=[c], requests=10**6, duration_s=seconds, warmup=0, api_key=KEYS[tenant],
                               timeout_s=600)
             for i, (tenant, c) in enumerate((("flood", flood), ("light", light)))}
    results = await asyncio.gather(*(run_bench(spec) for spec in specs.values()))
    return {tenant: {**vars(point), "refused": point.requests - point.ok}
            for tenant, ((point, _),) in zip(specs, results)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--light", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    tokenizer = load_tokenizer(None, SMOLLM2)
    prompts = synthetic(tokenizer, 4000, INPUT_TOKENS)
    serve = {"api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()]}
    rows: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="raylm-admission-") as tmp:
        for r in range(args.rounds):
            for system in SYSTEMS if r % 2 == 0 else list(SYSTEMS)[::-1]:
                setup = Setup(resolve_source(f"bundled:{SMOLLM2}", default_cache_dir()), SMOLLM2, SMOLLM2_ENGINE_ARGS,
                              SMOLLM2_ENV, SYSTEMS[system], raylm_serve=serve, api_key=KEYS["light"])
                with running("raylm", setup, Path(tmp)) as (url, _):
                    asyncio.run(load(url, prompts, 8, 1, 10))  # warm: a short load of both
                    points = asyncio.run(load(url, prompts, args.flood, args.light, args.seconds))
                rows[system].append({"round": r + 1, **points})
                print(f"round {r + 1} {system:8s} " + " | ".join(
                    f"{t}: {p['output_tok_s']:.1f} tok/s, TTFT p50 {1000 * (p['ttft_s']['p50'] or 0):.0f} ms, "
                    f"TPOT p50 {1000 * (p['tpot_s']['p50'] or 0):.0f} ms, {p['ok']}/{p['requests']} ok"
                    for t, p in points.items()), flush=True)
    report(rows, args)


def report(rows: dict[str, list[dict]], args) -> None:
    def med(system: str, tenant: str, key: str, q: str | None, scale: float) -> float:
        values = [v for row in rows[system] if (v := row[tenant][key][q] if q else row[tenant][key]) is not None]
        return scale * statistics.median(values) if values else float("nan")

    lines = [f"CPU flags: {cpu_flags()}; {time.strftime('%Y-%m-%d')}; SmolLM2 {SMOLLM2_ENGINE_ARGS['dtype']}; "
             f"flood c={args.flood}, light c={args.light}, {args.seconds:.0f} s; median of {args.rounds} rounds", "",
             "| system | tenant | " + " | ".join(name for name, *_ in FIGURES) + " |",
             "|---|---|" + "---|" * len(FIGURES)]
    for system in rows:
        for tenant in ("flood", "light"):
            lines.append(f"| {system} | {tenant} | " + " | ".join(
                f"{med(system, tenant, key, q, scale):,.1f}" for _, key, q, scale in FIGURES) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admission_batch.md").write_text("\n".join(lines) + "\n")
    (args.out / "admission_batch.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
