"""Which dtype is fastest on this machine: vLLM offline, each bundled model in each dtype, in one run.

    python benchmarks/dtype_probe.py [--dtypes bfloat16,float32]

For SmolLM2-135M: the prefill time of one 100-token prompt (median of 5; what a first token costs at c=1),
decode tok/s at batch 1 and at batch 16 (64 tokens each, ignore_eos). For all-MiniLM-L6-v2: sentences/s
over 2,000 short sentences. Each (model, dtype) runs in a fresh process with its OpenMP threads on every
core. Prints the CPU flags and what raylm picks here (raylm.hardware), so a run shows whether the rule
chose the fastest dtype. Results: benchmarks/results/dtype_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness import HERE, cpu_flags

from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.hardware import cpu_list, detect, fit
from raylm.models import MINILM, SMOLLM2, default_cache_dir, resolve_source

PROBE = textwrap.dedent("""
    import json, statistics, sys, time
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        with open(sys.argv[1]) as f:
            task, model, dtype, prompts = json.load(f)
        out = {}
        if task == "generate":
            llm = LLM(model=model, dtype=dtype, max_model_len=4096, enforce_eager=True)
            first = SamplingParams(temperature=0, max_tokens=1)
            llm.generate(prompts[:2], first, use_tqdm=False)  # warm up
            times = []
            for p in prompts[2:7]:
                start = time.perf_counter()
                llm.generate([p], first, use_tqdm=False)
                times.append(time.perf_counter() - start)
            out["prefill_ms"] = 1000 * statistics.median(times)
            params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
            for batch in (1, 16):
                start = time.perf_counter()
                done = llm.generate(prompts[:batch], params, use_tqdm=False)
                out[f"tok_s_batch{batch}"] = sum(len(o.outputs[0].token_ids) for o in done) / (time.perf_counter() - start)
        else:
            llm = LLM(model=model, dtype=dtype, runner="pooling", enforce_eager=True)
            llm.embed(prompts[:32], use_tqdm=False)  # warm up
            start = time.perf_counter()
            llm.embed(prompts, use_tqdm=False)
            out["sentences_s"] = len(prompts) / (time.perf_counter() - start)
        print("RESULT" + json.dumps(out), flush=True)
""")


def probe(task: str, model: str, dtype: str, prompts: list[str]) -> dict:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cpu_list(detect().cores), "VLLM_CPU_KVCACHE_SPACE": "2",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        script, args = Path(tmp) / "probe.py", Path(tmp) / "args.json"
        script.write_text(PROBE)
        args.write_text(json.dumps([task, model, dtype, prompts]))
        proc = subprocess.run([sys.executable, str(script), str(args)], capture_output=True, text=True, env=env,
                              timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"{task} {dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    cache = default_cache_dir()
    chat, embed = resolve_source(f"bundled:{SMOLLM2}", cache), resolve_source(f"bundled:{MINILM}", cache)
    prompts = synthetic(load_tokenizer(None, SMOLLM2), 16, 100)
    sentences = [f"Sentence {i}: ray serves models and vllm batches their tokens on every step." for i in range(2000)]
    rows = {}
    for dtype in args.dtypes.split(","):
        rows[dtype] = {**probe("generate", chat, dtype, prompts), **probe("embed", embed, dtype, sentences)}
        print(dtype, json.dumps({k: round(v, 1) for k, v in rows[dtype].items()}), flush=True)
    picked = fit({}, {}).engine_args.get("dtype", "auto")
    lines = [f"CPU flags: {cpu_flags()}; raylm picks {picked}; {time.strftime('%Y-%m-%d')}", "",
             "| dtype | SmolLM2 prefill, 100 tokens | tok/s batch 1 | tok/s batch 16 | MiniLM sentences/s |",
             "|---|---|---|---|---|"]
    for dtype, r in rows.items():
        lines.append(f"| {dtype}{' (picked)' if dtype == picked else ''} | {r['prefill_ms']:.1f} ms | "
                     f"{r['tok_s_batch1']:.1f} | {r['tok_s_batch16']:.1f} | {r['sentences_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dtype_probe.md").write_text(text)
    (args.out / "dtype_probe.json").write_text(json.dumps({"cpu_flags": cpu_flags(), "picked": picked,
                                                           "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
