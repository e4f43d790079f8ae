"""The seed's pipeline three ways, same data, one run: seed (per-row Python), raylm (columnar Ray Data),
and plain pyarrow/numpy without Ray (the floor on this machine). Prints rows/s and ratios.

Targets (issue 3): raylm >= 30x the seed's rows/s, and >= 0.3x plain pyarrow.

    python benchmarks/data_pipeline.py [--docs 200000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from seed_pipeline import generate_docs, plain_pyarrow, raylm_pipeline, seed_pipeline  # noqa: E402


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    total = fn()
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    table = generate_docs(args.docs)
    docs = table.to_pylist()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
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


if __name__ == "__main__":
    main()
