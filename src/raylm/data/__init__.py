"""Ray Data stages and pipelines for LLM data: one callable class per stage, columnar batches."""

from raylm.data.stages import IdsNorm, VocabIds, WhitespaceTokenize

__all__ = ["IdsNorm", "VocabIds", "WhitespaceTokenize"]
