"""Load generation and measurement against any OpenAI-compatible server."""

from raylm.bench.load import LoadResult, run_load

__all__ = ["LoadResult", "run_load"]
