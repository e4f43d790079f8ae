"""The seed's Ray Data pipeline (whitespace tokenize → vocabulary ids → L2 norm of the ids), two ways.

`seed_pipeline` is written as the seed intended, on current Ray: per-row `map`, then per-batch
`map_batches` looping over rows. (On Ray 2.60 a batch is a dict of columns, so the seed's
`for r in batch` iterated over column names and crashed; here the loops go over the rows of a batch.)
`raylm_pipeline` is the same three steps as raylm writes them: columnar pyarrow batches, no Python loop
over rows. Both return the same columns.

    python examples/seed_pipeline.py [NUM_DOCS]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import ray

from raylm.data import IdsNorm, VocabIds, WhitespaceTokenize

VOCAB = [f"w{i}" for i in range(5000)]


def generate_docs(n: int, seed: int = 0) -> pa.Table:
    """n documents of 10-50 words drawn from a 6,000-word space (1,000 words fall outside VOCAB)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 51, size=n)
    words = np.char.add("w", rng.integers(0, 6000, size=int(lengths.sum())).astype(str))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    text = [" ".join(words[s:s + k]) for s, k in zip(starts, lengths)]
    return pa.table({"id": np.arange(n), "text": text})


def seed_pipeline(docs: list[dict]) -> ray.data.Dataset:
    vocab = {w: i + 1 for i, w in enumerate(VOCAB)}

    def tokenize(row: dict) -> dict:
        row["tokens"] = row["text"].split()
        return row

    def to_ids(batch: dict) -> dict:
        batch["ids"] = [[vocab.get(t, 0) for t in tokens] for tokens in batch["tokens"]]
        return batch

    def embed(batch: dict) -> dict:
        batch["norm"] = [float(np.linalg.norm(np.asarray(ids, dtype=np.float64))) for ids in batch["ids"]]
        return batch

    return ray.data.from_items(docs).map(tokenize).map_batches(to_ids).map_batches(embed)


def raylm_pipeline(table: pa.Table) -> ray.data.Dataset:
    ds = ray.data.from_arrow(table)
    for stage in (WhitespaceTokenize(), VocabIds(VOCAB), IdsNorm()):
        ds = ds.map_batches(stage, batch_format="pyarrow", batch_size=16_384)
    return ds


def plain_pyarrow(table: pa.Table) -> pa.Table:
    """The floor: the same stages on one in-memory table, no Ray."""
    for stage in (WhitespaceTokenize(), VocabIds(VOCAB), IdsNorm()):
        table = stage(table)
    return table


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    table = generate_docs(n)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        for name, build in (("seed", lambda: seed_pipeline(table.to_pylist())),
                            ("raylm", lambda: raylm_pipeline(table))):
            start = time.perf_counter()
            rows = build().select_columns(["id", "norm"]).take_all()
            print(f"{name}: {len(rows)} rows, {n / (time.perf_counter() - start):,.0f} rows/s, "
                  f"sum of norms {sum(r['norm'] for r in rows):.1f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
