"""Columnar text stages: each takes a pyarrow Table batch and returns it with new columns.

They never loop over rows in Python: pyarrow compute kernels and numpy do the work on whole columns,
so the same stage runs inside Ray Data's `map_batches` or on a whole table without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class WhitespaceTokenize:
    """text → tokens (list<string>), split on whitespace."""

    def __init__(self, text_column: str = "text", out_column: str = "tokens") -> None:
        self.text_column, self.out_column = text_column, out_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Like str.split(): runs of whitespace are one separator, and blank text has no tokens.
        text = pc.utf8_trim_whitespace(batch[self.text_column])
        split = pc.utf8_split_whitespace(text)
        empty = pa.scalar([], pa.list_(pa.string()))
        return batch.append_column(self.out_column, pc.if_else(pc.equal(text, ""), empty, split))


class VocabIds:
    """tokens → ids (list<int32>) through a vocabulary; unknown tokens get `unk_id`."""

    def __init__(self, vocab: Sequence[str], tokens_column: str = "tokens", out_column: str = "ids",
                 unk_id: int = 0, offset: int = 1) -> None:
        # Token i of `vocab` gets id i + offset; id 0 is left for unknown tokens.
        self.vocab = pa.array(vocab, pa.string())
        self.tokens_column, self.out_column = tokens_column, out_column
        self.unk_id, self.offset = unk_id, offset

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = batch[self.tokens_column].combine_chunks()
        index = pc.index_in(pc.list_flatten(tokens), value_set=self.vocab)
        ids = pc.fill_null(pc.add(index, self.offset), self.unk_id).cast(pa.int32())
        return batch.append_column(self.out_column, _same_shape(tokens, ids))


class IdsNorm:
    """ids → L2 norm of the id vector (float64), the seed's toy "embedding"."""

    def __init__(self, ids_column: str = "ids", out_column: str = "norm") -> None:
        self.ids_column, self.out_column = ids_column, out_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch[self.ids_column].combine_chunks()
        values = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.float64)
        offsets = ids.offsets.to_numpy()
        sums = np.add.reduceat(np.square(values), offsets[:-1]) if len(values) else np.zeros(len(ids))
        sums[offsets[:-1] == offsets[1:]] = 0.0  # reduceat copies the next value for empty lists
        return batch.append_column(self.out_column, pa.array(np.sqrt(sums)))


def _same_shape(lists: pa.ListArray, flat_values: pa.Array) -> pa.ListArray:
    """Rebuild a list array with the offsets (and nulls) of `lists` around new flat values."""
    offsets = lists.offsets
    if lists.offset:  # a sliced array: make offsets start at 0 so they index `flat_values`
        offsets = pc.subtract(offsets, offsets[0])
    return pa.ListArray.from_arrays(offsets, flat_values, mask=lists.is_null())
