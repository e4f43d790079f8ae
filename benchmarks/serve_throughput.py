"""Output tok/s through `raylm serve` at concurrency 1 and 16, beside vLLM offline on the same model.

Same model (bundled SmolLM2-135M, bf16, eager), same engine arguments, same prompts (~100 tokens),
64 output tokens (ignore_eos), in one script. vLLM offline runs first in a subprocess, then raylm
serves the model alone (one replica bound to every core) and is driven over HTTP with streaming.

    python benchmarks/serve_throughput.py [--requests-per-level 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

from raylm.bench import run_load
from raylm.config import AppConfig, default_models
from raylm.models import SMOLLM2, default_cache_dir, resolve_source

MAX_TOKENS = 64
WORDS = ("ray serve routes requests to replicas while vllm batches tokens across sequences on every "
         "step of the engine so throughput grows with concurrency until the cores are saturated").split()


def make_prompts(n: int, words: int = 90) -> list[str]:
    # ~100 tokens each; distinct starts so no two prompts share a prefix.
    return [" ".join([f"Request {i}:"] + [WORDS[(i + j) % len(WORDS)] for j in range(words)]) for i in range(n)]


OFFLINE = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model, engine_args, prompts, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:4], params, use_tqdm=False)  # warmup
        out = {}
        for batch in (1, 16):
            start, tokens = time.perf_counter(), 0
            for i in range(0, 16 if batch == 1 else 48, batch):
                for o in llm.generate(prompts[i:i + batch], params, use_tqdm=False):
                    tokens += len(o.outputs[0].token_ids)
            out[batch] = tokens / (time.perf_counter() - start)
        print("RESULT" + json.dumps(out))
""")


def offline(model_path: str, engine_args: dict, env: dict, prompts: list[str]) -> dict[int, float]:
    arg = json.dumps([model_path, engine_args, prompts, MAX_TOKENS])
    proc = subprocess.run([sys.executable, "-c", OFFLINE, arg], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1200)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return {int(k): v for k, v in json.loads(line[6:]).items()}


def served(config: AppConfig, prompts: list[str], per_level: int) -> dict:
    from raylm.serve.control.service import start

    service = start(config)
    try:
        url = f"{service.url}/v1"
        asyncio.run(run_load(url, SMOLLM2, prompts, 4, MAX_TOKENS, 8))  # warmup
        out = {}
        for c in (1, 16):
            n = 16 if c == 1 else per_level
            r = asyncio.run(run_load(url, SMOLLM2, prompts, c, MAX_TOKENS, n))
            out[c] = {"tok_s": r.output_tok_s, "ttft_p50_ms": 1000 * r.ttft_p(0.5), "errors": r.errors}
        return out
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-level", type=int, default=48)
    args = parser.parse_args()

    smollm2 = default_models()[0]
    config = AppConfig(models=(smollm2,), serve={"port": 8765})
    prompts = make_prompts(64)
    path = resolve_source(smollm2.source, default_cache_dir())

    t = time.perf_counter()
    off = offline(path, smollm2.engine_args, smollm2.env, prompts)
    print(f"vLLM offline done in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    srv = served(config, prompts, args.requests_per_level)

    print(f"\nSmolLM2-135M bf16 eager, ~100-token prompts, {MAX_TOKENS} output tokens, engine args "
          f"{smollm2.engine_args}, env {smollm2.env}")
    print(f"{'concurrency':>11} | {'vLLM offline tok/s':>18} | {'raylm serve tok/s':>17} | {'ratio':>5} | "
          f"{'raylm TTFT p50':>14} | errors")
    for c in (1, 16):
        s = srv[c]
        print(f"{c:>11} | {off[c]:>18.1f} | {s['tok_s']:>17.1f} | {s['tok_s'] / off[c]:>5.2f} | "
              f"{s['ttft_p50_ms']:>11.1f} ms | {s['errors']}")


if __name__ == "__main__":
    main()
