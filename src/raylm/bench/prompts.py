"""Prompts for a benchmark: synthetic ones of an exact token length, or a JSONL file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from raylm.models import BUNDLED_MODELS, default_cache_dir, resolve_source

_TEXT = ("ray serve routes requests to replicas while vllm batches tokens across sequences on every step of the "
         "engine so throughput grows with concurrency until the cores are saturated and the queue holds the rest "
         "a benchmark sends the same load to every system and reports what each one answered in time").split()


def load_tokenizer(tokenizer: str | None, model: str):
    """`tokenizer` (a folder or an HF id), else the bundled model of that name, else `model` itself."""
    from transformers import AutoTokenizer

    source = tokenizer or model
    if tokenizer is None and model in BUNDLED_MODELS:
        source = resolve_source(f"bundled:{model}", default_cache_dir())
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no tokenizer for {source!r} ({exc.__class__.__name__}); "
                         "pass --tokenizer with a local folder") from None


def synthetic(tokenizer, n: int, input_tokens: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts of `input_tokens` tokens each (as the tokenizer counts them, ±1 at decode)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [f"Request {i}:"] + [rng.choice(_TEXT) for _ in range(2 * input_tokens + 8)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:input_tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def from_jsonl(path: Path) -> list[str]:
    """One prompt per line: {"prompt": "..."} (or "text")."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(str(row["prompt"] if "prompt" in row else row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt' (or 'text') field") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
