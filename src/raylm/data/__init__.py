"""Ray Data stages and pipelines for LLM data: one callable class per stage, columnar batches.

Inside your own Ray program (after `ray.init`):

    from raylm.data import JobSpec, Tokenize, run_job
    summary = run_job(JobSpec("tokenize", "in/*.jsonl", "out/"), Tokenize, {"tokenizer": "/path/to/model"})

or use a stage directly: `ds.map_batches(Embed, fn_constructor_kwargs={...}, batch_format="pyarrow",
concurrency=2)`.
"""

import importlib
from typing import Any

# Each name is imported when first used (PEP 562): `raylm serve` imports this package for its batch service's
# constants and would otherwise import Ray Data and pandas as it starts (0.5 s of CPU in each process).
_WHERE = {"JobError": "job", "JobSpec": "job", "Summary": "job", "run_job": "job", "Embed": "llm_stages",
          "Generate": "llm_stages", "Tokenize": "llm_stages", "IdsNorm": "stages", "VocabIds": "stages",
          "WhitespaceTokenize": "stages"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = ["Embed", "Generate", "IdsNorm", "JobError", "JobSpec", "Summary", "Tokenize", "VocabIds",
           "WhitespaceTokenize", "run_job"]
