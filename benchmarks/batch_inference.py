"""Batch generation and embedding: `raylm data` beside vLLM offline, Ray Data LLM and sentence-transformers.

    python benchmarks/batch_inference.py [--quick] [--only generate,embed]

One run, same models (the bundled SmolLM2-135M-Instruct and all-MiniLM-L6-v2), same rows, this machine.
Every system runs as its own fresh process (tree), timed from launch to exit (end to end, start-up included):
- generate: 1,000 distinct prompts of ~100 tokens (SmolLM2's tokenizer; each is the user message of the chat
  template), greedy, 64 output tokens with ignore_eos, so every system generates exactly 64,000 tokens.
  `raylm data generate` (CLI), vLLM offline `LLM.generate` in one process (in-process engine, the limit
  here), Ray Data LLM (`ray.data.llm.vLLMEngineProcessorConfig` + `build_processor`, on CPU).
- embed: 2,000 and 50,000 distinct sentences of 12-20 words. `raylm data embed` (CLI), vLLM offline
  `LLM.embed` (pooling runner), single-process sentence-transformers (2,000 only: ~6 min at 50,000).
Engines alike: bfloat16 (what raylm picks on this CPU), enforce_eager, the model's max_model_len,
max_num_seqs 256 and max_num_batched_tokens 4096 (vLLM's offline defaults on CPU, which raylm uses),
VLLM_CPU_KVCACHE_SPACE=1 (GiB, raylm's data default), OpenMP threads on every core.

Steady state = tokens (rows) / seconds after the engine is ready: vLLM offline and sentence-transformers time
the generate()/embed()/encode() call; raylm and Ray Data LLM from the engine's "init engine ... took" log line
(as the child's output brings it) to the last output (raylm: the newest part file; Ray Data LLM: when its
write returned). Start-up share = (ready - launch) / end to end.

Targets (issue 15): generate >= 0.95x vLLM offline and >= 1.2x Ray Data LLM in output tok/s, end to end and
steady state; embed >= 1.0x the faster of sentence-transformers and vLLM offline at 2,000 rows end to end,
>= 0.95x vLLM offline at 50,000. Results: benchmarks/results/batch_inference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from harness import HERE, cpu_flags

from raylm.bench.prompts import synthetic
from raylm.hardware import cpu_list, detect
from raylm.models import MINILM, SMOLLM2, default_cache_dir, resolve_source

ROOT = HERE.parent
RAYLM = str(Path(sys.executable).with_name("raylm"))
ENGINE = {"dtype": "bfloat16", "enforce_eager": True, "max_num_seqs": 256, "max_num_batched_tokens": 4096}
READY = re.compile(r"init engine \(profile, create kv cache, warmup model\) took|engine ready in")

VLLM_GENERATE = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams, TokensPrompt

    if __name__ == "__main__":
        args = json.load(open(sys.argv[1]))
        texts = [json.loads(line)["text"] for line in open(args["input"])]
        llm = LLM(model=args["model"], **args["engine"])
        ready = time.time()
        tok = llm.get_tokenizer()  # the chat template, rendered then tokenized, as raylm and Ray Data LLM do
        rendered = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=False) for t in texts]
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        params = SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True)
        start = time.time()
        out = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        end = time.time()
        print("RESULT" + json.dumps({"ready": ready, "start": start, "end": end, "rows": len(out),
                                     "tokens": sum(len(o.outputs[0].token_ids) for o in out),
                                     "prompt_tokens": sum(len(i) for i in ids)}), flush=True)
""")

VLLM_EMBED = textwrap.dedent("""
    import json, sys, time
    import pyarrow.parquet as pq
    from vllm import LLM

    if __name__ == "__main__":
        args = json.load(open(sys.argv[1]))
        texts = pq.read_table(args["input"])["text"].to_pylist()
        llm = LLM(model=args["model"], runner="pooling", **args["engine"])
        ready = time.time()
        out = llm.embed(texts, use_tqdm=False)
        end = time.time()
        print("RESULT" + json.dumps({"ready": ready, "start": ready, "end": end, "rows": len(out),
                                     "dim": len(out[0].outputs.embedding)}), flush=True)
""")

ST_EMBED = textwrap.dedent("""
    import json, sys, time
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    if __name__ == "__main__":
        args = json.load(open(sys.argv[1]))
        texts = pq.read_table(args["input"])["text"].to_pylist()
        model = SentenceTransformer(args["model"], device="cpu")
        ready = time.time()
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
        end = time.time()
        print("RESULT" + json.dumps({"ready": ready, "start": ready, "end": end, "rows": len(vectors)}), flush=True)
""")

RAY_DATA_LLM = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if __name__ == "__main__":
        args = json.load(open(sys.argv[1]))
        ray.init(include_dashboard=False)
        config = vLLMEngineProcessorConfig(
            model_source=args["model"],
            engine_kwargs=args["engine"],
            batch_size=args["batch_size"],
            concurrency=1,
            # No GPU: the engine actor reserves one CPU instead of its default bundle of one GPU.
            placement_group_config={"bundles": [{"CPU": 1}]},
            runtime_env={"env_vars": args["env"]},
            # The CPU stages default to 1 CPU per actor: with the engine's, more than this machine's 2 (the job
            # waits forever). A quarter each, as the nested stage configs allow.
            chat_template_stage=dict(num_cpus=0.25), tokenize_stage=dict(num_cpus=0.25),
            detokenize_stage=dict(num_cpus=0.25),
        )
        max_tokens = args["max_tokens"]
        processor = build_processor(
            config,
            preprocess=lambda row: dict(
                messages=[{"role": "user", "content": row["text"]}],
                sampling_params=dict(temperature=0, max_tokens=max_tokens, ignore_eos=True)),
            postprocess=lambda row: dict(generated_text=row["generated_text"],
                                         num_generated_tokens=row["num_generated_tokens"]),
            preprocess_map_kwargs=dict(num_cpus=0.25), postprocess_map_kwargs=dict(num_cpus=0.25),
        )
        ds = processor(ray.data.read_json(args["input"], ray_remote_args=dict(num_cpus=0.25)))
        ds.write_parquet(args["output"], ray_remote_args=dict(num_cpus=0.25))
        end = time.time()
        import pyarrow.parquet as pq
        t = pq.read_table(args["output"])
        print("RESULT" + json.dumps({"end": end, "rows": len(t),
                                     "tokens": int(sum(t["num_generated_tokens"].to_pylist()))}), flush=True)
        ray.shutdown()
""")


def run_child(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, timeout: float = 1800) -> dict:
    """Run one system as a fresh process; its output lines are stamped as they arrive (ready detection)."""
    log = log_dir / f"{name}.log"
    launch = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    exit_t = time.time()
    reader.join(10)
    log.write_text("\n".join(f"{t - launch:8.2f} {text}" for t, text in lines) + "\n")
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}; see {log}:\n" + "\n".join(t for _, t in lines[-40:]))
    result = next((json.loads(t[len("RESULT"):]) for _, t in lines if t.startswith("RESULT")), {})
    ready = next((t for t, text in lines if READY.search(text)), None)
    return {"launch": launch, "exit": exit_t, "e2e_s": exit_t - launch, "ready_line": ready, **result}


def script_cmd(tmp: Path, name: str, source: str, args: dict) -> list[str]:
    (tmp / f"{name}.py").write_text(source)
    (tmp / f"{name}.json").write_text(json.dumps(args))
    return [sys.executable, str(tmp / f"{name}.py"), str(tmp / f"{name}.json")]


def output_rows(out: Path, column: str | None = None) -> tuple[int, int, float]:
    """raylm's OUT: rows, the column's sum, and the newest part file's time (the last output)."""
    files = sorted((out / "data").glob("*.parquet"))
    rows = total = 0
    for f in files:
        t = pq.read_table(f, columns=[column] if column else ["_row"])
        rows += len(t)
        total += sum(t[column].to_pylist()) if column else 0
    errors = list((out / "errors").glob("*"))
    if errors:
        raise RuntimeError(f"{out}: {len(errors)} error files")
    return rows, total, max(f.stat().st_mtime for f in files)


def record(system: str, r: dict, unit: str, expected: int, rate: str, rows: list, raw: dict) -> None:
    """Check a child's count, then keep and print its summary."""
    if r.get(unit) != expected:
        raise RuntimeError(f"{system} produced {r.get(unit)} {unit}, expected {expected}")
    raw[system] = r
    rows.append(summarize(system, r, expected, rate))
    print(f"  {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})}",
          flush=True)


def summarize(system: str, r: dict, units: int, unit: str) -> dict:
    ready = r.get("ready") or r.get("ready_line")
    start = r.get("start", ready)
    end = r.get("end")
    row = {"system": system, "e2e_s": r["e2e_s"], f"e2e_{unit}": units / r["e2e_s"],
           "startup_s": (ready - r["launch"]) if ready else None, "steady_s": (end - start) if ready else None}
    row[f"steady_{unit}"] = units / row["steady_s"] if row["steady_s"] else None
    row["startup_share"] = row["startup_s"] / r["e2e_s"] if row["startup_s"] is not None else None
    return row


def generate_bench(tmp: Path, n: int, max_tokens: int, env: dict[str, str], log_dir: Path,
                   systems: list[str]) -> tuple[list[dict], dict]:
    from transformers import AutoTokenizer

    model = resolve_source(f"bundled:{SMOLLM2}", default_cache_dir())
    prompts = synthetic(AutoTokenizer.from_pretrained(model), n, 100, seed=15)
    assert len(set(prompts)) == n
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"text": p, "ignore_eos": True}) + "\n" for p in prompts))
    expected = n * max_tokens
    rows, raw = [], {}
    for system in systems:
        print(f"generate: {system} ...", flush=True)
        if system == "raylm":
            out = tmp / "gen-raylm"
            r = run_child("generate-raylm", [RAYLM, "data", "generate", str(src), str(out), "--max-tokens",
                                             str(max_tokens), "--temperature", "0"], env, log_dir)
            got, r["tokens"], r["end"] = output_rows(out, "num_generated_tokens")
            r["rows"] = got
        elif system == "vllm-offline":
            r = run_child("generate-vllm", script_cmd(tmp, "vllm_generate", VLLM_GENERATE, {
                "input": str(src), "model": model, "engine": ENGINE, "max_tokens": max_tokens}),
                {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, log_dir)
        else:
            out = tmp / "gen-raydata"
            r = run_child("generate-ray-data-llm", script_cmd(tmp, "ray_data_llm", RAY_DATA_LLM, {
                "input": str(src), "output": str(out), "model": model, "engine": ENGINE, "max_tokens": max_tokens,
                "batch_size": 64, "env": {k: env[k] for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE",
                                                              "VLLM_CPU_OMP_THREADS_BIND")}}), env, log_dir)
        record(system, r, "tokens", expected, "tok_s", rows, raw)
    return rows, raw


def sentences(n: int, seed: int = 15) -> list[str]:
    text = ("ray data streams blocks through actors while the engine embeds every sentence in batches and "
            "the pipeline writes parquet files that a later job can read back quickly for search and "
            "ranking across many small documents gathered from logs tickets notes and manuals")
    words = text.split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(11, 19)))
        out.append(f"Note {i}: {body}.")
    return out


def embed_bench(tmp: Path, n: int, env: dict[str, str], log_dir: Path, systems: list[str]) -> tuple[list[dict], dict]:
    model = resolve_source(f"bundled:{MINILM}", default_cache_dir())
    src = tmp / f"sentences-{n}.parquet"
    pq.write_table(pa.table({"text": sentences(n)}), src)
    rows, raw = [], {}
    for system in systems:
        print(f"embed {n}: {system} ...", flush=True)
        if system == "raylm":
            out = tmp / f"embed-raylm-{n}"
            r = run_child(f"embed{n}-raylm", [RAYLM, "data", "embed", str(src), str(out)], env, log_dir)
            r["rows"], _, r["end"] = output_rows(out)
        elif system == "vllm-offline":
            r = run_child(f"embed{n}-vllm", script_cmd(tmp, "vllm_embed", VLLM_EMBED, {
                "input": str(src), "model": model, "engine": {"dtype": "bfloat16", "enforce_eager": True}}),
                {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, log_dir)
        else:
            r = run_child(f"embed{n}-st", script_cmd(tmp, "st_embed", ST_EMBED, {"input": str(src), "model": model}),
                          env, log_dir)
        record(system, r, "rows", n, "rows_s", rows, raw)
    return rows, raw


def fmt(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def table(rows: list[dict], unit: str, label: str) -> list[str]:
    lines = [f"| system | end to end | {label} end to end | steady state {label} | start-up | start-up share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['e2e_s']:.1f} s | {fmt(r[f'e2e_{unit}'])} | {fmt(r[f'steady_{unit}'])} | "
                     f"{fmt(r['startup_s'])} s | {fmt(100 * r['startup_share'] if r['startup_share'] is not None else None, 0)}% |")
    return lines


def ratio(rows: list[dict], key: str, base: str) -> float | None:
    by = {r["system"]: r for r in rows}
    if "raylm" not in by or base not in by or not by[base].get(key) or not by["raylm"].get(key):
        return None
    return by["raylm"][key] / by[base][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: 64 prompts, 500/2,000 sentences")
    parser.add_argument("--only", default="generate,embed")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--embed-sizes", default=None, help="comma-separated (default 2000,50000)")
    parser.add_argument("--generate-systems", default="raylm,vllm-offline,ray-data-llm")
    parser.add_argument("--embed-systems", default="raylm,vllm-offline,sentence-transformers",
                        help="sentence-transformers runs only up to 10,000 rows")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="batch_inference", help="results file stem")
    args = parser.parse_args()
    n_prompts = args.prompts or (64 if args.quick else 1000)
    sizes = [int(x) for x in (args.embed_sizes or ("500,2000" if args.quick else "2000,50000")).split(",")]
    only = args.only.split(",")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": cpu_list(detect().cores), "TOKENIZERS_PARALLELISM": "false"}
    flags = cpu_flags()
    print(f"CPU flags: {flags}; cores {env['VLLM_CPU_OMP_THREADS_BIND']}", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="batch_inference_logs_"))
    print(f"child logs: {log_dir}", flush=True)
    report: dict = {"cpu_flags": flags, "date": time.strftime("%Y-%m-%d"), "engine": ENGINE,
                    "kv_cache_gib": 1, "quick": args.quick}
    md = [(f"CPU flags: {flags}; {time.strftime('%Y-%m-%d')}; engines: bfloat16, eager, max_num_seqs 256, "
           "4,096 batched tokens, 1 GiB KV cache, OpenMP on all cores"), ""]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "generate" in only:
            rows, raw = generate_bench(tmp, n_prompts, args.max_tokens, env, log_dir,
                                       args.generate_systems.split(","))
            report["generate"] = {"prompts": n_prompts, "max_tokens": args.max_tokens, "rows": rows, "raw": raw}
            md += [(f"### generate: {n_prompts:,} prompts of ~100 tokens (+ chat template), {args.max_tokens} "
                    f"tokens each (ignore_eos): {n_prompts * args.max_tokens:,} tokens"), ""]
            md += table(rows, "tok_s", "tok/s") + [""]
            md += ["| target | end to end | steady state |", "|---|---|---|"]
            for base, target in (("vllm-offline", 0.95), ("ray-data-llm", 1.2)):
                e, s = ratio(rows, "e2e_tok_s", base), ratio(rows, "steady_tok_s", base)
                md.append(f"| raylm ≥ {target}× {base} | {fmt(e, 2)}× {'met' if e and e >= target else 'missed'} | "
                          f"{fmt(s, 2)}× {'met' if s and s >= target else 'missed'} |")
            md.append("")
        if "embed" in only:
            report["embed"] = {}
            for n in sizes:
                systems = [s for s in args.embed_systems.split(",") if s != "sentence-transformers" or n <= 10_000]
                rows, raw = embed_bench(tmp, n, env, log_dir, systems)
                report["embed"][str(n)] = {"rows": rows, "raw": raw}
                md += [f"### embed: {n:,} sentences of 12-20 words", ""] + table(rows, "rows_s", "rows/s") + [""]
                e_v, s_v = ratio(rows, "e2e_rows_s", "vllm-offline"), ratio(rows, "steady_rows_s", "vllm-offline")
                line = f"raylm / vLLM offline: {fmt(e_v, 2)}× end to end, {fmt(s_v, 2)}× steady state"
                if "sentence-transformers" in systems:
                    e_s = ratio(rows, "e2e_rows_s", "sentence-transformers")
                    best = min(e_v or 0, e_s or 0)
                    line += (f"; / sentence-transformers {fmt(e_s, 2)}× end to end. Target ≥ 1.0× the faster "
                             f"end to end: {fmt(best, 2)}× {'met' if best >= 1.0 else 'missed'}")
                else:
                    line += f". Target ≥ 0.95× vLLM offline: {'met' if (e_v or 0) >= 0.95 else 'missed'} end to end"
                md += [line, ""]
    text = "\n".join(md)
    print("\n" + text)
    if not args.quick or args.name != "batch_inference":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.md").write_text(text)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
