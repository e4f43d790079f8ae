"""vLLM's CPU performance tips, each measured through `raylm serve` on this machine, beside bare `vllm serve`.

    python benchmarks/cpu_tips.py [--rounds 2] [--variants none,iomp,tcmalloc,tcmalloc+iomp,...]

vLLM's CPU page recommends tcmalloc and Intel OpenMP in LD_PRELOAD, thread binding (VLLM_CPU_OMP_THREADS_BIND),
the KV cache size (VLLM_CPU_KVCACHE_SPACE) and `max_num_batched_tokens`. Each variant changes one of them in
the model's `env` / `engine_args` (a replica's env reaches its process at exec, LD_PRELOAD included):
    none            nothing preloaded; else raylm's defaults (bf16 where the CPU has it, eager, threads bound
                    to every core, 2 GiB KV cache)
    iomp            LD_PRELOAD Intel OpenMP (libiomp5, from the intel-openmp wheel vLLM's CPU build installs)
    tcmalloc        LD_PRELOAD tcmalloc (libtcmalloc_minimal from Debian's package, unpacked by `make setup`
                    into .venv/lib without root: raylm.hardware.cpu_libraries)
    tcmalloc+iomp   both, as vLLM's page shows
    nobind          VLLM_CPU_OMP_THREADS_BIND=nobind (the OS places the threads)
    kv8             an 8 GiB KV cache
    passive         OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE), not after libgomp's spin
    mbt512          max_num_batched_tokens 512 (vLLM's default for its OpenAI server on a CPU: 2048)
    vllm            bare `vllm serve`, its defaults for everything above but the KV cache (2 GiB; its own default,
                    92% of the node, does not start beside anything else)
Load per variant and round: SmolLM2 streaming completions (~100 prompt tokens, 64 output, ignore_eos) at c=16
(64 requests after 8 warmup), then MiniLM embeddings (64 requests of 16 texts, 4 at a time). Rounds alternate
the order (A B C, then C B A). Results: benchmarks/results/cpu_tips.{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV, Setup, arguments, cpu_flags, running

from raylm import hardware
from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import MINILM, SMOLLM2, default_cache_dir, resolve_source

# LD_PRELOAD empty unless the variant sets it: the model's env wins over what raylm preloads by default.
BASE_ENV = {**SMOLLM2_ENV, "LD_PRELOAD": ""}
C, REQUESTS, WARMUP, INPUT_TOKENS, OUTPUT_TOKENS = 16, 64, 8, 100, 64
EMBED_REQUESTS, EMBED_TEXTS, EMBED_CONCURRENCY = 64, 16, 4


def variant(name: str) -> tuple[str, dict[str, str], dict]:
    """(system, env, engine_args) of a variant."""
    libs = hardware.cpu_libraries()
    preload = {"iomp": [libs.get("iomp")], "tcmalloc": [libs.get("tcmalloc")],
               "tcmalloc+iomp": [libs.get("tcmalloc"), libs.get("iomp")]}.get(name)
    if preload is not None:
        if None in preload:
            raise FileNotFoundError(f"{name}: library not found ({libs})")
        return "raylm", {**BASE_ENV, "LD_PRELOAD": " ".join(preload)}, SMOLLM2_ENGINE_ARGS
    return {"none": ("raylm", BASE_ENV, SMOLLM2_ENGINE_ARGS),
            "nobind": ("raylm", {**BASE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}, SMOLLM2_ENGINE_ARGS),
            "kv8": ("raylm", {**BASE_ENV, "VLLM_CPU_KVCACHE_SPACE": "8"}, SMOLLM2_ENGINE_ARGS),
            "passive": ("raylm", {**BASE_ENV, "OMP_WAIT_POLICY": "PASSIVE"}, SMOLLM2_ENGINE_ARGS),
            "mbt512": ("raylm", BASE_ENV, {**SMOLLM2_ENGINE_ARGS, "max_num_batched_tokens": 512}),
            # vLLM's own KV cache default asks for 92% of the node and failed here (19.52 of 19.35 GiB free)
            "vllm": ("vllm", {"VLLM_CPU_KVCACHE_SPACE": "2"}, SMOLLM2_ENGINE_ARGS)}[name]


async def embeddings_per_s(url: str) -> float:
    texts = [f"raylm measures embedding throughput, sentence {i} of a batch." for i in range(EMBED_TEXTS)]
    sem = asyncio.Semaphore(EMBED_CONCURRENCY)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one() -> None:
            async with sem:
                r = await client.post(f"{url}/embeddings", json={"model": MINILM, "input": texts})
                r.raise_for_status()
        await asyncio.gather(*(one() for _ in range(4)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(EMBED_REQUESTS)))
        return EMBED_REQUESTS * EMBED_TEXTS / (time.perf_counter() - start)


def run_variant(name: str, work: Path, prompts: list[str]) -> dict:
    system, env, args = variant(name)
    cache = default_cache_dir()
    smol = Setup(resolve_source(f"bundled:{SMOLLM2}", cache), SMOLLM2, args, env)
    with running(system, smol, work) as (url, _):
        spec = BenchSpec(url=url, model=SMOLLM2, prompts=prompts, output_tokens=OUTPUT_TOKENS, concurrency=[C],
                         requests=REQUESTS, warmup=WARMUP, duration_s=600)
        (point, _), = asyncio.run(run_bench(spec))
    embed_env = {k: v for k, v in env.items() if k != "VLLM_CPU_KVCACHE_SPACE"} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    embed_args = {k: v for k, v in args.items() if k != "max_model_len"}
    minilm = Setup(resolve_source(f"bundled:{MINILM}", cache), MINILM, embed_args,
                   embed_env if system != "vllm" else {"VLLM_CPU_KVCACHE_SPACE": "1"}, raylm_model={"task": "embed"})
    with running(system, minilm, work, probe=False) as (url, _):
        emb = asyncio.run(embeddings_per_s(url))
    return {"tok_s": point.output_tok_s, "ttft_p50_ms": 1000 * point.ttft_s["p50"],
            "itl_p50_ms": 1000 * (point.itl_s["p50"] or 0), "errors": point.requests - point.ok, "embed_s": emb}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--variants", default="none,iomp,tcmalloc,tcmalloc+iomp,vllm")
    args = parser.parse_args()
    names = args.variants.split(",")
    tokenizer = load_tokenizer(None, SMOLLM2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raylm-tips-") as tmp:
        for r in range(args.rounds):
            prompts = synthetic(tokenizer, REQUESTS + WARMUP, INPUT_TOKENS, seed=r)
            for name in (names if r % 2 == 0 else names[::-1]):
                try:
                    row = {"round": r + 1, "variant": name, **run_variant(name, Path(tmp), prompts)}
                except Exception as exc:
                    print(f"round {r + 1} {name}: FAILED {exc}", flush=True)
                    continue
                rows.append(row)
                print(f"round {r + 1} {name:14s} c={C}: {row['tok_s']:6.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:6.0f} "
                      f"ms, ITL p50 {row['itl_p50_ms']:5.1f} ms, errors {row['errors']} | embeddings "
                      f"{row['embed_s']:6.1f}/s", flush=True)
    report(rows, names, args.out)


def report(rows: list[dict], names: list[str], out: Path) -> None:
    import ray
    import vllm

    meta = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "ray": ray.__version__, "vllm": vllm.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_tips.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = [row for row in rows if row["variant"] == "none"]
    lines = [f"# vLLM's CPU tips through raylm ({meta['date']}, CPU flags: {meta['cpu_flags']}, {meta['cores']} "
             f"cores, ray {meta['ray']}, vllm {meta['vllm']})", "",
             f"SmolLM2 c={C} streaming and MiniLM embeddings; median of rounds; ratios against `none` (raylm's "
             "defaults) of the same rounds.", "",
             "| variant | tok/s | × none | TTFT p50 ms | embeddings/s | × none | rounds (tok/s) |",
             "|---|---|---|---|---|---|---|"]
    med = statistics.median
    for name in names:
        mine = [row for row in rows if row["variant"] == name]
        if not mine:
            continue
        tok, emb = med(r["tok_s"] for r in mine), med(r["embed_s"] for r in mine)
        btok = med(r["tok_s"] for r in base) if base else float("nan")
        bemb = med(r["embed_s"] for r in base) if base else float("nan")
        lines.append(f"| {name} | {tok:.1f} | {tok / btok:.2f} | {med(r['ttft_p50_ms'] for r in mine):.0f} | "
                     f"{emb:.1f} | {emb / bemb:.2f} | {', '.join(format(r['tok_s'], '.1f') for r in mine)} |")
    (out / "cpu_tips.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
