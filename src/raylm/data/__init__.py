"""Ray Data stages and pipelines for LLM data: one callable class per stage, columnar batches.

Inside your own Ray program (after `ray.init`):

    from raylm.data import JobSpec, Tokenize, run_job
    summary = run_job(JobSpec("tokenize", "in/*.jsonl", "out/"), Tokenize, {"tokenizer": "/path/to/model"})

or use a stage directly: `ds.map_batches(Embed, fn_constructor_kwargs={...}, batch_format="pyarrow",
concurrency=2)`.
"""

from raylm.data.job import JobError, JobSpec, Summary, run_job
from raylm.data.llm_stages import Embed, Generate, Tokenize
from raylm.data.stages import IdsNorm, VocabIds, WhitespaceTokenize

__all__ = ["Embed", "Generate", "IdsNorm", "JobError", "JobSpec", "Summary", "Tokenize", "VocabIds",
           "WhitespaceTokenize", "run_job"]
