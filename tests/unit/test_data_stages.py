import math

import pyarrow as pa

from raylm.data import IdsNorm, VocabIds, WhitespaceTokenize


def run(table: pa.Table) -> pa.Table:
    vocab = ["the", "cat", "sat"]
    for stage in (WhitespaceTokenize(), VocabIds(vocab), IdsNorm()):
        table = stage(table)
    return table


def test_stages_on_a_plain_table():
    out = run(pa.table({"text": ["the cat  sat", "", "dog the", "  cat\tcat\n"]})).to_pydict()
    assert out["tokens"] == [["the", "cat", "sat"], [], ["dog", "the"], ["cat", "cat"]]
    assert out["ids"] == [[1, 2, 3], [], [0, 1], [2, 2]]
    assert out["norm"] == [math.sqrt(14), 0.0, 1.0, math.sqrt(8)]


def test_sliced_and_chunked_batches_keep_their_rows():
    table = pa.concat_tables([pa.table({"text": ["x the", "cat"]}), pa.table({"text": ["sat sat", "the"]})])
    out = run(table.slice(1, 3)).to_pydict()
    assert out["ids"] == [[2], [3, 3], [1]]
    assert out["norm"] == [2.0, math.sqrt(18), 1.0]
