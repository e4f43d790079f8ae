"""The seed's pipeline three ways, same data, one run: seed (per-row Python), raylm (columnar Ray Data),
and plain pyarrow/numpy without Ray (the floor on this machine). Prints rows/s and ratios.

Then embeddings/s of raylm's embed job (vLLM pooling runner in a Ray Data actor) against single-process
sentence-transformers on the same sentences, both timed end to end (model load included).

Targets (issue 3): raylm >= 30x the seed's rows/s, >= 0.3x plain pyarrow; embed >= 1.0x
sentence-transformers.

    python benchmarks/data_pipeline.py [--docs 200000] [--rounds 2] [--sentences 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from seed_pipeline import generate_docs, plain_pyarrow, raylm_pipeline, seed_pipeline  # noqa: E402


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    total = fn()
    return time.perf_counter() - start, total


def embed_comparison(n: int) -> dict[str, float]:
    import tempfile

    import pyarrow.parquet as pq

    from raylm.data import Embed, JobSpec, run_job
    from raylm.models import MINILM, default_cache_dir, resolve_source

    model = resolve_source(f"bundled:{MINILM}", default_cache_dir())
    sentences = [" ".join(t.split()[:12]) for t in generate_docs(n, seed=1)["text"].to_pylist()]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"text": sentences}), f"{tmp}/in.parquet")
        start = time.perf_counter()
        summary = run_job(JobSpec("embed", f"{tmp}/in.parquet", f"{tmp}/out"), Embed,
                          {"model": model, "engine_args": {"enforce_eager": True, "dtype": "bfloat16"}},
                          batch_size=512, env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "1"})
        rates["raylm data embed"] = summary.rows_out / (time.perf_counter() - start)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed (pip install -e '.[bench]'): no baseline", file=sys.stderr)
        return rates
    start = time.perf_counter()
    SentenceTransformer(model, device="cpu").encode(sentences, batch_size=64, normalize_embeddings=True)
    rates["sentence-transformers"] = n / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=20_000, help="0 skips the embedding comparison")
    args = parser.parse_args()
    table = generate_docs(args.docs)
    docs = table.to_pylist()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    embed_rates = embed_comparison(args.sentences) if args.sentences else {}
    runs: dict[str, list[float]] = {"seed": [], "raylm": [], "pyarrow": []}
    sums: dict[str, float] = {}
    try:
        for _ in range(args.rounds):  # interleaved rounds: machine drift hits every variant alike
            for name, fn in (
                ("seed", lambda: sum(r["norm"] for r in seed_pipeline(docs).select_columns(["norm"]).take_all())),
                ("raylm", lambda: sum(r["norm"] for r in raylm_pipeline(table).select_columns(["norm"]).take_all())),
                ("pyarrow", lambda: sum(plain_pyarrow(table)["norm"].to_pylist())),
            ):
                seconds, sums[name] = timed(fn)
                runs[name].append(args.docs / seconds)
    finally:
        ray.shutdown()
    assert len({round(v, 3) for v in sums.values()}) == 1, f"pipelines disagree: {sums}"
    rate = {name: statistics.median(r) for name, r in runs.items()}
    print(f"\n{args.docs:,} docs, median of {args.rounds} rounds")
    for name in runs:
        print(f"{name:>8}: {rate[name]:>12,.0f} rows/s")
    print(f"raylm / seed    = {rate['raylm'] / rate['seed']:.1f}x  (target >= 30x)")
    print(f"raylm / pyarrow = {rate['raylm'] / rate['pyarrow']:.2f}x (target >= 0.3x)")
    if embed_rates:
        print(f"\nembeddings, {args.sentences:,} sentences, end to end (model load included)")
        for name, value in embed_rates.items():
            print(f"{name:>22}: {value:>8,.0f} sentences/s")
        print(f"raylm / sentence-transformers = {embed_rates['raylm data embed'] / embed_rates['sentence-transformers']:.2f}x"
              " (target >= 1.0x)")


if __name__ == "__main__":
    main()
