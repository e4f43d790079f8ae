"""LLM stages on Ray Data batches (pyarrow Tables): tokenize, embed, generate.

Each is a callable class: the model or tokenizer loads once in `__init__` (Ray Data runs them in an actor
pool), `__call__` maps a batch. Rows arriving with an `error`, or failing here (no text, prompt longer than
the context), keep flowing with `error` set; they are never dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from raylm.data.io import ERROR

logger = logging.getLogger(__name__)


def texts_and_errors(batch: pa.Table, text_column: str) -> tuple[list[str | None], list[str | None]]:
    """The batch's texts (None where unusable) and its error column with missing texts marked."""
    errors = batch[ERROR].to_pylist() if ERROR in batch.column_names else [None] * len(batch)
    if text_column not in batch.column_names:
        return [None] * len(batch), [e or f"no {text_column!r} column" for e in errors]
    column = batch[text_column]
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        return [None] * len(batch), [e or f"{text_column} is not a string ({column.type})" for e in errors]
    texts = column.to_pylist()
    errors = [e or (f"{text_column} is missing" if t is None else None) for t, e in zip(texts, errors)]
    return [t if e is None else None for t, e in zip(texts, errors)], errors


def _with(batch: pa.Table, columns: dict[str, pa.Array], errors: list[str | None]) -> pa.Table:
    batch = batch.drop_columns([c for c in [*columns, ERROR] if c in batch.column_names])
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch.append_column(ERROR, pa.array(errors, pa.string()))


class Tokenize:
    """text → `input_ids` (list<int32>) and `num_tokens`, with the model's own (fast) tokenizer.

    With `chunk_size`, each text becomes rows of at most `chunk_size` tokens (`chunk` numbers them).
    """

    def __init__(self, tokenizer: str, text_column: str = "text", chunk_size: int | None = None,
                 add_special_tokens: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.text_column, self.chunk_size, self.special = text_column, chunk_size, add_special_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, errors = texts_and_errors(batch, self.text_column)
        ok = [t for t in texts if t is not None]
        encoded = iter(self.tokenizer(ok, add_special_tokens=self.special)["input_ids"] if ok else [])
        ids = [next(encoded) if t is not None else [] for t in texts]
        if self.chunk_size:
            return self._chunks(batch, ids, errors)
        return _with(batch, {"input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "num_tokens": pa.array([len(i) for i in ids], pa.int32())}, errors)

    def _chunks(self, batch: pa.Table, ids: list[list[int]], errors: list[str | None]) -> pa.Table:
        size = self.chunk_size
        counts = np.array([max(1, -(-len(i) // size)) for i in ids])  # an empty or failed row stays one row
        take = np.repeat(np.arange(len(ids)), counts)
        chunk = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.array([], int)
        windows = [ids[r][k * size:(k + 1) * size] for r, k in zip(take, chunk)]
        return _with(batch.take(pa.array(take)), {
            "chunk": pa.array(chunk, pa.int32()),
            "input_ids": pa.array(windows, pa.list_(pa.int32())),
            "num_tokens": pa.array([len(w) for w in windows], pa.int32()),
        }, [errors[r] for r in take])


def _unnice() -> None:
    """Run this process's threads at nice 0: Ray starts its workers at nice 15 (`RAY_worker_niceness`).

    The engine is the job's work, and its OpenMP team waits at every op for its slowest thread: at nice 15
    any nice-0 process (the driver's Ray Data loop, the raylet) preempts one thread and stalls them all (on
    2 cores, SmolLM2: 171 → 191 tok/s). Linux's nice is per thread and inherited by threads
    made later (OpenMP's, torch's), so every existing thread is set now, before the engine starts. Without
    the right (CAP_SYS_NICE or RLIMIT_NICE) this does nothing.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) <= 0:
            return
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except OSError as exc:
        logger.info("engine stays at Ray's worker niceness: %s", exc)


def _hardware_here() -> Any:
    """`hardware.detect()` without importing torch, which it does to count GPUs: OpenMP reads
    OMP_NUM_THREADS once, when torch loads it, so torch must not load before `_make_llm` sets it. Loaded
    under Ray's OMP_NUM_THREADS=1, the engine ran on one core of two (SmolLM2: 191 → 241 tok/s)."""
    import ray

    from raylm import hardware

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    return hardware.detect(len(ray.get_gpu_ids()) if in_actor and "torch" not in sys.modules else None)


def fit_here(engine_args: dict[str, Any], environ: Mapping[str, str], hw: Any, model_dir: str | None = None) -> Any:
    """The engine fitted to this machine, with what the model's `env` set in this process (its runtime env)
    winning: a user's VLLM_CPU_OMP_THREADS_BIND and VLLM_CPU_KVCACHE_SPACE are kept, as the config documents."""
    from raylm import hardware

    user = {k: environ[k] for k in (hardware.BIND_ENV, hardware.KV_ENV) if environ.get(k)}
    return hardware.fit(engine_args, user, hw, model_dir)


def _make_llm(model: str, engine_args: dict[str, Any], **kwargs: Any) -> Any:
    """vLLM's offline engine, in this process, with dtype and threads fitted to this machine.

    In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: the scheduler and the model in this actor, no EngineCore
    or worker process busy-polling beside it) with OMP_NUM_THREADS = the bound cores: Ray sets 1 for an actor
    of one CPU. Both must be in the environment before torch is first imported here, which is now.
    """
    from raylm import hardware

    _unnice()
    fitted = fit_here(engine_args, os.environ, _hardware_here(), model)
    os.environ.update(fitted.env)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    binding = fitted.env.get(hardware.BIND_ENV)
    if binding and binding not in ("auto", "nobind"):
        os.environ["OMP_NUM_THREADS"] = str(len(hardware.parse_cpu_list(binding)))
    logger.info("%s: %s", model, "; ".join(fitted.notes))
    start = time.perf_counter()
    from vllm import LLM

    llm = LLM(model=model, **{**fitted.engine_args, **kwargs})
    # On stderr, not the logger: a data job's actors log at WARNING, and this line is how a run shows its
    # start-up (Ray prefixes it with the actor's name).
    print(f"raylm: {model}: engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return llm


def _too_long(lengths: list[int], limit: int, texts: list[str | None], errors: list[str | None]) -> None:
    for i, n in enumerate(lengths):
        if texts[i] is not None and n > limit:
            errors[i] = f"prompt has {n} tokens, more than the model's context of {limit}"
            texts[i] = None


class _EngineStage:
    """A stage whose engine lives on one thread of its own: made there, and every batch runs there.

    OpenMP keeps one thread team per calling thread. Ray Data builds the stage on the actor's main thread
    but calls it from another (its single-thread wrapper), so the engine's ops ran in a second team: not
    the one vLLM bound to the cores, and, with more OpenMP threads than cores, libgomp's workers stop
    spinning and sleep between ops. Measured on 2 cores (SmolLM2, 512 prompts): the engine used 149% of
    200% CPU with 18% of the machine idle; vLLM offline in one thread, 198%.
    """

    def __init__(self, model: str, engine_args: dict[str, Any], **kwargs: Any) -> None:
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-engine")
        self.llm = self._engine_thread.submit(_make_llm, model, engine_args, **kwargs).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._engine_thread.submit(self.map, batch).result()

    def map(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


class Embed(_EngineStage):
    """text → `embedding`: unit-norm float32 vectors (fixed-size list) from vLLM's pooling runner."""

    def __init__(self, model: str, text_column: str = "text", engine_args: dict[str, Any] | None = None) -> None:
        super().__init__(model, engine_args or {}, runner="pooling")
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.dim = self.llm.llm_engine.model_config.get_hidden_size()
        self.text_column = text_column

    def map(self, batch: pa.Table) -> pa.Table:
        from vllm import TokensPrompt

        texts, errors = texts_and_errors(batch, self.text_column)
        ok = [t for t in texts if t is not None]
        # Tokenize once: the ids both check the context length and go to the engine as they are.
        encoded = iter(self.tokenizer(ok)["input_ids"] if ok else [])
        ids = [next(encoded) if t is not None else [] for t in texts]
        _too_long([len(i) for i in ids], self.max_len, texts, errors)
        rows = [i for i, t in enumerate(texts) if t is not None]
        vectors = np.zeros((len(texts), self.dim), np.float32)
        if rows:
            prompts = [TokensPrompt(prompt_token_ids=ids[i]) for i in rows]
            out = np.array([o.outputs.embedding for o in self.llm.embed(prompts, use_tqdm=False)], np.float32)
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            vectors[rows] = out
        flat = pa.array(vectors.reshape(-1))
        failed = pa.array([t is None for t in texts])  # an error row has no embedding: null, not zeros
        return _with(batch, {"embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=failed)}, errors)


class Generate(_EngineStage):
    """text → `generated_text`, token counts and `finish_reason`, with vLLM batch inference.

    Chat models get their chat template (the text is the user's message). Rows may carry their own
    `max_tokens`, `temperature` and `ignore_eos` (generate exactly `max_tokens`, as benchmarks do), and
    `adapter`: one of `adapters` (name → folder; the engine needs enable_lora); others use the defaults
    given here (`adapter` None: the base model).
    """

    def __init__(self, model: str, text_column: str = "text", engine_args: dict[str, Any] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, ignore_eos: bool = False,
                 adapters: dict[str, str] | None = None, adapter: str | None = None) -> None:
        super().__init__(model, engine_args or {})
        from vllm.lora.request import LoRARequest

        self.loras = {name: LoRARequest(name, n + 1, path) for n, (name, path) in enumerate((adapters or {}).items())}
        self.adapter = adapter
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        self.text_column, self.max_tokens, self.temperature = text_column, max_tokens, temperature
        self.ignore_eos = ignore_eos

    def _prompt_ids(self, text: str) -> list[int]:
        if self.chat:  # render, then tokenize: the template already holds the special tokens
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=False)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def _row_param(self, batch: pa.Table, name: str, default: Any, cast: type) -> list:
        if name not in batch.column_names:
            return [default] * len(batch)
        return [default if v is None else cast(v) for v in batch[name].to_pylist()]

    def map(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams, TokensPrompt

        texts, errors = texts_and_errors(batch, self.text_column)
        max_tokens = self._row_param(batch, "max_tokens", self.max_tokens, int)
        temperature = self._row_param(batch, "temperature", self.temperature, float)
        ignore_eos = self._row_param(batch, "ignore_eos", self.ignore_eos, bool)
        adapters = self._row_param(batch, "adapter", self.adapter, str)
        for i, name in enumerate(adapters):
            if name is not None and name not in self.loras and texts[i] is not None:
                errors[i] = f"no adapter {name!r}; this model's: {', '.join(self.loras) or 'none'}"
                texts[i] = None
        prompts = [self._prompt_ids(t) if t is not None else [] for t in texts]
        _too_long([len(p) + m for p, m in zip(prompts, max_tokens)], self.max_len, texts, errors)
        rows = [i for i, t in enumerate(texts) if t is not None]
        results: dict[int, Any] = {}
        if rows:
            params = [SamplingParams(max_tokens=max_tokens[i], temperature=temperature[i], ignore_eos=ignore_eos[i])
                      for i in rows]
            loras = [self.loras.get(adapters[i]) for i in rows] if self.loras else None
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in rows], params,
                                        use_tqdm=False, lora_request=loras)
            results = {i: o.outputs[0] for i, o in zip(rows, outputs)}
        get = results.get
        return _with(batch, {
            "generated_text": pa.array([get(i).text if i in results else None for i in range(len(texts))]),
            "num_prompt_tokens": pa.array([len(p) for p in prompts], pa.int32()),
            "num_generated_tokens": pa.array([len(get(i).token_ids) if i in results else 0
                                              for i in range(len(texts))], pa.int32()),
            "finish_reason": pa.array([get(i).finish_reason if i in results else None
                                       for i in range(len(texts))], pa.string()),
        }, errors)
