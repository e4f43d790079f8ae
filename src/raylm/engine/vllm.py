"""The vLLM engine: AsyncLLM plus vLLM's own OpenAI serving classes, so API coverage follows vLLM.

vLLM is imported lazily, inside methods: importing raylm (config, CLI, tests) must not import vLLM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import copy
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

from raylm import _ray, _vllm, errors
from raylm.contract import PATHS, TASK_ENDPOINTS, Adapter, Endpoint, sse_payload
from raylm.engine import counting, media
from raylm.engine.protocol import Meter, Prepared, PromptSize, Result

logger = logging.getLogger(__name__)

# Requests whose prompts vLLM measures itself (score, rerank, tokenize, ...) are counted for the queue only,
# up to this many contexts' worth: more than a replica's queue holds by default.
ESTIMATE_BUDGET_CONTEXTS = 8
# The request whose tokens the engine is making: set in `create`, read where vLLM's serving classes call the
# engine (AsyncLLM.generate / encode, which take no meter). A stream's generator runs in the task that streams
# it, made inside `create`'s caller after the set, so it inherits the same value (asyncio copies the context).
_METER: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("raylm_meter", default=None)
# The same way, the traceparent vLLM's own request span continues (its otlp_traces_endpoint set).
_TRACE: contextvars.ContextVar[str | None] = contextvars.ContextVar("raylm_trace", default=None)


def ray_stat_logger() -> type:
    """vLLM's Ray stat logger, less its one per-token series (`vllm:inter_token_latency_seconds`).

    Ray's metrics agent replays every histogram observation it is sent, one by one; that series has one per
    generated token: 0.122 → 0.082 ms of the agent's CPU per token without it (c=64, 2 cores), taken from the
    engine. Its per-request forms stay: `vllm:request_time_per_output_token_seconds` (vLLM's mean per request)
    and raylm's `raylm_inter_token_latency_seconds` (each stream's mean gap at the ingress).
    RAYLM_VLLM_TOKEN_METRICS=1 in a model's env keeps the series."""
    base = _vllm.load("RayPrometheusStatLogger")
    if os.environ.get("RAYLM_VLLM_TOKEN_METRICS") == "1":
        return base

    class PerRequest(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.histogram_inter_token_latency = {i: _Unobserved() for i in self.histogram_inter_token_latency}

    return PerRequest


class _Unobserved:
    def observe(self, value: float) -> None:
        pass


class VLLMEngine:
    """One AsyncLLM (its EngineCore runs in a child process) serving one model under one name."""

    def __init__(self, model: str, served_name: str, task: str, engine_args: dict[str, Any]) -> None:
        self.model = model
        self.served_name = served_name
        self.task = task
        self.engine_args = dict(engine_args)
        self.endpoints: frozenset[Endpoint] = TASK_ENDPOINTS.get(task, frozenset())  # narrowed at start
        self._handlers: dict[Endpoint, tuple[Any, Any]] = {}
        self._stack = AsyncExitStack()
        self._state: Any = None
        self.client: Any = None
        self._last_step = time.monotonic()  # when the engine last returned a step's outputs
        self.generated_tokens = 0  # since start, every request's (for `raylm status`)
        self._tokenizer: Any = None
        self._counter_tokenizer: Any = None
        self._max_token_bytes = 256
        self._counter: ThreadPoolExecutor | None = None
        self.max_model_len = 0
        self._multimodal = False
        self._adapter_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.startup: dict[str, float] = {}  # seconds per phase of `start` (the replica logs its timeline)

    def build_args(self) -> Any:
        """vLLM's own serve arguments (defaults from its parser), with ours and the user's on top."""
        parser = _vllm.load("make_arg_parser")(_vllm.load("FlexibleArgumentParser")())
        known = vars(parser.parse_args([]))
        for key in self.engine_args:
            if key.replace("-", "_") not in known:
                raise errors.ConfigError(f"unknown vLLM engine argument {key!r}")
        # A mapping goes through vLLM's own parsing, as `vllm serve --x '{json}'` would (it makes the config
        # objects, e.g. structured_outputs_config, that vLLM does not make from a dict itself).
        args = parser.parse_args([part for key, value in self.engine_args.items() if isinstance(value, dict)
                                  for part in (f"--{key.replace('_', '-')}", json.dumps(value))])
        args.model = self.model
        args.served_model_name = [self.served_name]
        if self.task == "embed":
            args.runner = "pooling"
        for key, value in self.engine_args.items():
            if not isinstance(value, dict):
                setattr(args, key.replace("-", "_"), value)
        return args

    async def start(self) -> None:
        started = time.monotonic()
        import ray
        from starlette.datastructures import State
        from vllm import AsyncEngineArgs

        marks = [("vLLM imports", time.monotonic())]
        args = self.build_args()
        engine_args = AsyncEngineArgs.from_cli_args(args)
        context = _vllm.load("UsageContext").OPENAI_API_SERVER
        # In a Ray process, vLLM's Prometheus metrics go out through Ray's metrics export (as in Ray Serve LLM).
        # Every engine step is reported to the progress logger (with a custom logger, vLLM keeps stats on).
        loggers: list[Any] = [self._progress_logger]
        if ray.is_initialized() and not engine_args.disable_log_stats:
            loggers.append(ray_stat_logger())
        config = engine_args.create_engine_config(usage_context=context)
        marks.append(("engine config", time.monotonic()))
        stderr_at = _stderr_size()
        try:
            with cpu_layout(config, self.engine_args) as cores, engine_core_by_fork(cores):  # EngineCore starts here
                self.client = _vllm.load("AsyncLLM").from_vllm_config(
                    config, usage_context=context, stat_loggers=loggers,
                    enable_log_requests=engine_args.enable_log_requests,
                    disable_log_stats=engine_args.disable_log_stats)
        except Exception as exc:
            cause = engine_core_cause(stderr_at)
            if cause is None:
                raise
            raise RuntimeError(f"the engine of {self.served_name} did not start: {cause}") from exc
        self._stack.callback(self.client.shutdown)
        _ray.renice_engine()
        self.client.generate = _metered(self.client.generate)  # before the serving classes take the client
        self.client.encode = _metered(self.client.encode)
        marks.append(("engine core (process, weights, KV cache, warm-up)", time.monotonic()))
        # Counting for admission uses copies, one for the loop and one for its thread (a tokenizer is used
        # from one thread at a time): vLLM's renderer uses its own from its threads.
        self._tokenizer = copy.deepcopy(self.client.get_tokenizer())
        self._counter_tokenizer = copy.deepcopy(self._tokenizer)
        self._max_token_bytes = counting.max_token_bytes(self._tokenizer)
        self._counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-count")
        self._stack.callback(self._counter.shutdown, wait=False)
        self.max_model_len = config.model_config.max_model_len
        self._multimodal = config.model_config.is_multimodal_model
        tasks = await self.client.get_supported_tasks()
        self._state = State()
        await _vllm.load("init_app_state")(self.client, self._state, args, tasks)
        marks.append(("serving classes", time.monotonic()))
        self.startup = {name: t - before for (name, t), (_, before) in zip(marks, [("", started), *marks])}
        self._handlers = {e: h for e, h in _handlers(self._state).items() if h[1] is not None and e in self.endpoints}
        self.endpoints = frozenset(self._handlers)

    def kv_events_endpoints(self) -> tuple[str, str | None] | None:
        """Where the EngineCore publishes its KV cache events and replays them (the endpoints it bound, from its
        handshake), or None when it publishes none."""
        sources = self.client.engine_core.get_kv_event_sources() if self.client is not None else {}
        config = sources.get(0) or next(iter(sources.values()), None)
        return None if config is None or config.publisher != "zmq" else (config.endpoint, config.replay_endpoint)

    def _progress_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        engine = self

        class Progress(_vllm.load("StatLoggerBase")):
            def __init__(self, *_: Any) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
                engine._last_step = time.monotonic()
                if iteration_stats is not None:
                    engine.generated_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self) -> None:
                pass

        return Progress()

    def stalled_s(self) -> float:
        if self.client is None or self.num_running() == 0:
            return 0.0
        return time.monotonic() - self._last_step

    async def prepare(self, endpoint: Endpoint, body: dict, on_loop: bool = False) -> Prepared:
        """Checked, parsed (vLLM's request models) and counted before admission: a bad request is refused
        without taking a queue place. On the counting thread (its own tokenizer: one thread uses each), or on
        the caller's loop for a small body (protocol.py)."""
        if on_loop:
            return self._prepare(endpoint, body, self._tokenizer)
        return await asyncio.get_running_loop().run_in_executor(self._counter, self._prepare, endpoint, body,
                                                                self._counter_tokenizer)

    def _prepare(self, endpoint: Endpoint, body: dict, tokenizer: Any) -> Prepared:
        if endpoint not in self.endpoints:
            raise errors.InvalidRequestError(
                f"model {self.served_name!r} does not serve {PATHS[endpoint][0]}",
                param="model", code="unsupported_endpoint")
        fetches = media.check(body, self.served_name, self._multimodal, self.engine_args.get("allowed_media_domains"),
                              self.engine_args.get("allowed_local_media_path"))
        # Counted first: a prompt that cannot fit is refused before its body is parsed (counting.py).
        size = self._count(endpoint, body, tokenizer)
        if size.longest > self.max_model_len > 0:
            raise errors.InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{size.longest} or more.", param={"chat": "messages", "completions": "prompt"}.get(endpoint, "input"),
                code="context_length_exceeded")
        request_cls, _ = self._handlers[endpoint]
        try:
            request = _adapter(request_cls).validate_python(body)
        except Exception as exc:  # pydantic's ValidationError, or vLLM's own checks inside validators
            if hasattr(exc, "errors"):
                raise errors.validation_error(exc) from None
            raise _from_vllm_exception(exc) from None
        if endpoint in ("chat", "completions"):
            try:
                self._check_sampling(endpoint, request, size)
            except Exception as exc:  # vLLM's VLLMValidationError, ValueError: mapped as its server would
                raise _from_vllm_exception(exc) from None
        return Prepared(endpoint, request, size, _sequences(request), fetches)

    def _check_sampling(self, endpoint: Endpoint, request: Any, size: PromptSize) -> None:
        """vLLM checks sampling parameters (max_tokens ≥ 1, temperature, top_p, n ranges, ...) when its
        handler builds them, after admission here; built once now with vLLM's own functions, so a bad value
        is refused before it takes a queue place. The prompt length is raylm's count (without the chat
        template: never more than vLLM's), so nothing vLLM would accept is refused."""
        get_max_tokens = _vllm.load("get_max_tokens")
        if getattr(request, "use_beam_search", False):
            return
        serving = self._state.openai_serving_chat if endpoint == "chat" else self._state.openai_serving_completion
        wanted = getattr(request, "max_completion_tokens", None)
        max_tokens = get_max_tokens(
            self.max_model_len, wanted if wanted is not None else request.max_tokens, size.longest,
            serving.default_sampling_params, serving.override_max_tokens,
            truncate_prompt_tokens=request.truncate_prompt_tokens)
        request.to_sampling_params(max_tokens, serving.default_sampling_params)

    async def create(self, prepared: Prepared, request_id: str, meter: Meter | None = None,
                     trace: str | None = None) -> Result:
        if self.client is not None and self.num_running() == 0:
            self._last_step = time.monotonic()  # an idle engine's last step says nothing of a stall
        _, handler = self._handlers[prepared.endpoint]
        _METER.set(meter)
        _TRACE.set(trace)
        try:
            result = await handler(prepared.request, None)
        except Exception as exc:  # vLLM reports bad requests by raising; map them as its server would
            if prepared.fetches:  # one answer, whatever the media host did (media.py)
                raise errors.InvalidRequestError(media.MEDIA_FAILED, param="messages", code="media_not_loaded") from exc
            raise _from_vllm_exception(exc) from exc
        return _to_result(result)

    async def use_adapter(self, adapter: Adapter) -> None:
        """vLLM's own registry (OpenAIServingModels) loads it: the engine reads its weights into its CPU cache
        of max_cpu_loras adapters (least recently used evicted, read again from the folder on its next use),
        and vLLM's handlers find it by the request's `model`."""
        models = self._state.openai_serving_models
        known = models.lora_requests.get(adapter.name)
        if known is not None and known.lora_path == adapter.path:
            return
        async with self._adapter_locks[adapter.name]:  # the first requests for it come together: load once
            known = models.lora_requests.get(adapter.name)
            if known is not None and known.lora_path == adapter.path:
                return
            load = _vllm.load("LoadLoRAAdapterRequest")(lora_name=adapter.name, lora_path=adapter.path,
                                                         load_inplace=known is not None)
            try:
                result = await models.load_lora_adapter(load)
            except Exception as exc:  # vLLM reports by value; anything raised is the same kind of failure
                result = exc
        if isinstance(result, str):
            logger.info("%s: adapter %s loaded", self.served_name, adapter.name)
            return
        why = result.error.message if hasattr(result, "error") else repr(result)
        logger.warning("%s: adapter %s did not load: %s", self.served_name, adapter.name, why)
        # vLLM's reason names the server's folders: it stays in the replica's log.
        raise errors.InvalidRequestError(f"adapter {adapter.name!r} could not be loaded on its replica (its "
                                         "weights did not load; the replica's log says why)", param="model",
                                         code="adapter_load_failed")

    def _count(self, endpoint: Endpoint, body: dict, tokenizer: Any) -> PromptSize:
        """Prompt tokens, bounded work (counting.py): a prompt over the context stops being counted."""
        if endpoint in ("completions", "embeddings"):
            sizes = [len(p) if p and isinstance(p[0], int)  # ids: as they are
                     else self._tokens(tokenizer, p, self.max_model_len) for p in counting.prompts(endpoint, body)]
            return PromptSize(sum(sizes), max(sizes, default=0))
        if endpoint == "chat":  # one conversation, one prompt
            n = self._tokens(tokenizer, counting.chat_texts(body), self.max_model_len)
            return PromptSize(n, n)
        return self._estimate(endpoint, body, tokenizer)

    def _estimate(self, endpoint: Endpoint, body: dict, tokenizer: Any) -> PromptSize:
        """Every string in the body (but the model's name) counts: an estimate that bounds the queue. A
        Responses or Messages request is one conversation (its length is checked); for the others the
        prompt's true length is vLLM's to check (a score request's documents are prompts of their own)."""
        texts, stack = [], [v for k, v in body.items() if k != "model"]
        while stack:  # a loop, not recursion: bodies may be nested deeply
            value = stack.pop()
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
        if endpoint in ("responses", "messages"):
            total = self._tokens(tokenizer, texts, self.max_model_len)
            return PromptSize(total, total)
        return PromptSize(self._tokens(tokenizer, texts, ESTIMATE_BUDGET_CONTEXTS * self.max_model_len), 0)

    def _tokens(self, tokenizer: Any, texts: list[str], budget: int) -> int:
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        return counting.count(encode, texts, budget, self._max_token_bytes)

    def num_running(self) -> int:
        return self.client.get_num_unfinished_requests()

    async def health(self) -> None:
        await self.client.check_health()

    async def shutdown(self) -> None:
        await self._stack.aclose()


@contextlib.contextmanager
def cpu_layout(config: Any, user_args: dict[str, Any]) -> Iterator[list[int] | None]:
    """On a CPU with one worker, run the worker inside the EngineCore process (vLLM's `uni` executor).

    vLLM's CPU platform always gives the worker a process of its own (`mp`); EngineCore and worker then hand
    every step over shared memory, each busy-polling for the other (sched_yield for 1 s after each read),
    which takes the cores the model needs. Bare `vllm serve` on 2 cores, same engine arguments, measured:
    tiny Llama at c=64 2,033 → 3,736 tok/s, SmolLM2 at c=16 193 → 246 tok/s.

    `mp` also sets the worker's OpenMP environment from VLLM_CPU_OMP_THREADS_BIND when it spawns it
    (OMP_NUM_THREADS, OMP_PLACES, OMP_PROC_BIND); here vLLM's same code sets it for the EngineCore process,
    spawned in this block. Without it EngineCore inherits Ray's OMP_NUM_THREADS=1 (TTFT 170 vs 130 ms for a
    100-token prompt). libgomp binds EngineCore's main thread to those cores, and every thread it starts
    later, its scheduling and I/O threads too. So `uni` only where the binding covers every core this
    process may use (raylm's default binds them all): a narrower binding (a user's, or `auto`, which keeps
    one core for the scheduler) stays `mp`, or the engine's own threads would queue behind the model on its
    cores (fairness test: light tenant's TTFT p99 3.5-3.8x its unloaded value under `uni` on core 1 of 2,
    1.13-2.0x under `mp`). A user's `distributed_executor_backend` wins: `mp` keeps vLLM's layout, `uni`
    (which vLLM's CPU platform would turn into `mp`) takes this one whatever the binding, for throughput
    when the rest of the serving path has cores of its own (benchmarks/dataplane.py).
    """
    current_platform, OMPProcessManager = _vllm.load("current_platform"), _vllm.load("OMPProcessManager")
    parallel = config.parallel_config
    chosen = user_args.get("distributed_executor_backend")
    if not (current_platform.is_cpu() and chosen in (None, "uni") and parallel.world_size == 1
            and parallel.data_parallel_size == 1 and parallel.distributed_executor_backend == "mp"):
        yield None
        return
    omp, cores = OMPProcessManager(config), os.sched_getaffinity(0)
    covers_all = omp.skip_setup or set(omp.cpu_lists[0]) >= cores  # `nobind`: as it is
    if chosen is None and not covers_all:
        logger.info("engine layout: vLLM's (worker process apart); OpenMP binds cores %s of %s",
                    omp.cpu_lists[0], sorted(cores))
        yield None
        return
    logger.info("engine layout: the model runs inside EngineCore (uni executor)")
    parallel.distributed_executor_backend = "uni"
    with omp.configure_omp_envs(rank=0, local_rank=0):
        yield None if omp.skip_setup else list(omp.cpu_lists[0])


START_ENV = "RAYLM_ENGINE_CORE_START"  # how EngineCore's process starts: spawn (vLLM's), forkserver, fork
# What the forkserver imports before it forks an EngineCore (vLLM's own server preloads the first), after it
# has made itself die with its replica (parent_death), and before it freezes its heap (frozen_heap).
FORKSERVER_PRELOAD = ["raylm.engine.parent_death", "vllm.v1.engine.async_llm", "vllm.v1.engine.core",
                      "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.cpu_worker", "raylm.engine.frozen_heap"]


def start_forkserver() -> bool:
    """Start this process's forkserver, which imports FORKSERVER_PRELOAD once, now, beside whatever this
    process does next (a warm worker's own imports: serve/replica/warm.py). Only where the model's env asks for
    it (RAYLM_ENGINE_CORE_START: `forkserver` is the default on a CPU). Returns whether it did."""
    if os.environ.get(START_ENV, "forkserver") != "forkserver":
        return False
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True


@contextlib.contextmanager
def engine_core_by_fork(cores: list[int] | None) -> Iterator[None]:
    """Start the EngineCore process by a fork of a process that has imported torch and vLLM already: the
    forkserver this replica started (`forkserver`, raylm's default on a CPU: serve/replica/warm.py), or this
    replica itself (`fork`, opt-in); `spawn` (RAYLM_ENGINE_CORE_START in a model's env) keeps vLLM's start.

    vLLM spawns it inside a Ray actor (`_maybe_force_spawn`) and on every CPU (`platforms/cpu.py`), and a spawned
    EngineCore imports torch and vLLM again before its first line: ~11 s alone on 2 cores, ~22 s with a second
    replica starting beside it (benchmarks/cold_start.py). Spawn guards what a fork cannot carry: an initialised
    CUDA context (so only on the CPU platform here), and OpenMP settings, which libgomp reads from the
    environment once, when torch is loaded: the child sets them itself (`_engine_core_child`), and takes the
    replica's environment of this moment (the forkserver's is the one it started with). The forkserver is
    vLLM's own choice for its server (`VLLM_WORKER_MULTIPROC_METHOD=forkserver`): a small process with one
    thread, where the replica has Ray's threads and a large heap. A forked child never calls Ray and ends
    with os._exit, as multiprocessing's fork does. `fork` stays opt-in: with it the two tests that measure a
    live stream's gaps beside an attack failed inside the full suite (p99 ratios 3.81 and 3.55, bound 1.5),
    and SmolLM2's TTFT at c=1 was 6-20 ms behind in both rounds of serving_compare."""
    how = os.environ.get(START_ENV, "forkserver")
    if how not in ("fork", "forkserver") or not _vllm.load("current_platform").is_cpu():
        yield
        return
    import multiprocessing

    context, prefix = multiprocessing.get_context(how), _vllm.load("VLLM_PROCESS_NAME_PREFIX")

    class ForkContext:
        def Process(self, target: Any, name: str, kwargs: dict[str, Any]) -> Any:  # noqa: N802 - multiprocessing's
            env = dict(os.environ) if how == "forkserver" else None
            return context.Process(target=_engine_core_child, name=name,
                                   args=(target, cores, f"{prefix}::{name}", env), kwargs=kwargs)

        def __getattr__(self, attr: str) -> Any:
            return getattr(context, attr)

    utils = _vllm.module("get_mp_context")
    original = utils.get_mp_context
    utils.get_mp_context = ForkContext
    try:
        yield
    finally:
        utils.get_mp_context = original


def _engine_core_child(target: Any, cores: list[int] | None, title: str, env: dict[str, str] | None,
                       **kwargs: Any) -> None:
    """The forked EngineCore's first steps. Its title, as a spawned one names itself (VLLM::EngineCore), and the
    kernel's name too (the first 15 bytes): from the replica, by Ray's setproctitle (vLLM's cannot rewrite a
    command line that Ray's own has moved); from the forkserver, by vLLM's, before the replica's environment
    (`env`) replaces the forkserver's (setproctitle finds its room beside the environment as the process began).
    Then the OpenMP layout a spawned one would read from OMP_NUM_THREADS and OMP_PLACES (vLLM's
    OMPProcessManager, set in cpu_layout): one thread per bound core."""
    import ctypes

    if env is None:
        _ray.load("setproctitle")(title)
    else:
        import setproctitle  # vLLM's

        from raylm.engine.parent_death import die_with_parent

        die_with_parent()  # with the forkserver, which dies with the replica
        setproctitle.setproctitle(title)
        os.environ.clear()
        os.environ.update(env)
    ctypes.CDLL(None).prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    if cores:
        import torch

        os.sched_setaffinity(0, cores)  # the threads OpenMP starts from here on inherit it
        torch.set_num_threads(len(cores))
    target(**kwargs)


def _metered(call: Any) -> Any:
    """AsyncLLM.generate or encode, counting each request's tokens into the meter of the raylm request that
    runs it (several engine requests add up: a completions batch of prompts, a Responses tool loop) as vLLM's
    usage counts them: the prompt's tokens, its cached ones, every choice's generated ones."""
    def metered(*args: Any, **kwargs: Any) -> Any:
        meter, trace = _METER.get(), _TRACE.get()
        if trace is not None and not kwargs.get("trace_headers"):
            kwargs["trace_headers"] = {"traceparent": trace}
        outputs = call(*args, **kwargs)
        if meter is None:
            return outputs
        params = args[1] if len(args) > 1 else kwargs.get("sampling_params", kwargs.get("pooling_params"))
        # DELTA outputs (streams) carry the new tokens; the others all so far.
        delta = getattr(getattr(params, "output_kind", None), "name", "") == "DELTA"
        return _counted(outputs, meter, delta)

    return metered


async def _counted(outputs: AsyncIterator[Any], meter: Meter, delta: bool) -> AsyncIterator[Any]:
    counted: dict[int, int] = {}  # tokens counted so far per choice index
    prompted = cached = 0
    async with contextlib.aclosing(outputs):
        async for output in outputs:
            if not prompted and output.prompt_token_ids is not None:
                prompted = len(output.prompt_token_ids)
                meter.prompt_tokens += prompted
                if meter.ids is not None:
                    meter.prompt_ids = list(output.prompt_token_ids)
            if output.num_cached_tokens and output.num_cached_tokens != cached:
                meter.cached_tokens += output.num_cached_tokens - cached
                cached = output.num_cached_tokens
            choices = getattr(output, "outputs", None)
            for choice in choices if isinstance(choices, list) else ():  # (a pooling output has one PoolingOutput)
                token_ids = getattr(choice, "token_ids", None)
                if token_ids is None:
                    continue
                before = counted.get(choice.index, 0)
                now = before + len(token_ids) if delta else len(token_ids)
                counted[choice.index] = now
                meter.generated(now - before)
                if meter.ids is not None and choice.index == 0:
                    meter.ids.extend(token_ids if delta else token_ids[before:])
            yield output


def _sequences(request: Any) -> int:
    """Sequences the engine runs for a request, from vLLM's parsed values (`"4"` and `4.0` are 4 there)."""
    counts = [v for v in (getattr(request, "n", None), getattr(request, "best_of", None)) if isinstance(v, int)]
    return max([1, *counts])


@functools.cache
def _adapter(request_cls: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(request_cls)  # EmbeddingRequest is a Union, not a model class


def _handlers(state: Any) -> dict[Endpoint, tuple[Any, Any]]:
    """Each endpoint's request model and handler, from vLLM's own serving classes (None: not for this model)."""
    def method(owner: str, name: str) -> Any:
        serving = getattr(state, owner, None)
        return None if serving is None else getattr(serving, name)

    scores = getattr(state, "serving_scores", None)
    request = _vllm.load
    return {
        "chat": (request("ChatCompletionRequest"), method("openai_serving_chat", "create_chat_completion")),
        "completions": (request("CompletionRequest"), method("openai_serving_completion", "create_completion")),
        "responses": (request("ResponsesRequest"), method("openai_serving_responses", "create_responses")),
        "messages": (request("AnthropicMessagesRequest"), method("anthropic_serving_messages", "create_messages")),
        "count_tokens": (request("AnthropicCountTokensRequest"),
                         method("anthropic_serving_messages", "count_tokens")),
        "embeddings": (request("EmbeddingRequest"), getattr(state, "serving_embedding", None)),
        "score": (request("ScoreRequest"), scores), "rerank": (request("RerankRequest"), scores),
        "tokenize": (request("TokenizeRequest"), method("serving_tokenization", "create_tokenize")),
        "detokenize": (request("DetokenizeRequest"), method("serving_tokenization", "create_detokenize")),
    }


_NO_CAUSE = "Engine core initialization failed"  # what vLLM raises in this process: "see root cause above"


def _stderr_size() -> int:
    try:
        return os.fstat(2).st_size
    except OSError:
        return 0


def engine_core_cause(since: int, stderr: str = "/proc/self/fd/2") -> str | None:
    """Why the EngineCore process failed to start. It writes its traceback to the stderr it shares with this
    process (in a Ray worker, the worker's log file), and this process gets only "Engine core initialization
    failed. See root cause above". The last exception line written there since `since` bytes, when stderr
    is a file."""
    try:
        path = os.path.realpath(stderr)
        if not os.path.isfile(path):  # a terminal or a pipe: nothing to read back
            return None
        with open(path, "rb") as f:
            f.seek(max(since, os.path.getsize(path) - 2**20))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    causes = [line for line in errors.exception_lines(text) if _NO_CAUSE not in line]
    return causes[-1] if causes else None


# vLLM's errors name its command-line flags; in raylm they are fields of the model's config.
_FLAGS = {"--enable-auto-tool-choice": "`enable_auto_tool_choice`", "--tool-call-parser": "`tool_call_parser`",
          "--reasoning-parser": "`reasoning_parser`"}


def _error(status: int, message: str, param: str | None) -> errors.APIError:
    if any(flag in message for flag in _FLAGS):
        for flag, field in _FLAGS.items():
            message = message.replace(flag, field)
        message += " in this model's raylm config (docs/tools.md)"
    return errors.from_status(status, message, param)


def _from_vllm_exception(exc: Exception) -> errors.APIError:
    if isinstance(exc, errors.APIError):
        return exc
    err = _vllm.load("create_error_response")(exc).error
    return _error(int(err.code), err.message, err.param)


def _to_result(result: Any) -> Result:
    from fastapi.responses import JSONResponse

    if isinstance(result, _vllm.load("ErrorResponse")):
        raise _error(int(result.error.code), result.error.message, result.error.param)
    if isinstance(result, JSONResponse):
        if result.status_code >= 400:
            err = json.loads(result.body)["error"]
            raise _error(result.status_code, err["message"], err.get("param"))
        return bytes(result.body)
    if hasattr(result, "model_dump_json"):  # as vLLM's routers dump each (Responses: aliases; Anthropic: no nulls)
        return result.model_dump_json(by_alias=True, exclude_none=type(result).__module__.startswith(
            "vllm.entrypoints.anthropic")).encode()
    if hasattr(result, "__aiter__"):
        return _payloads(result)
    raise errors.InvalidRequestError("this request's response format is not supported",
                                     param="encoding_format")


async def _payloads(frames: AsyncIterator[Any]) -> AsyncIterator[str]:
    """vLLM's SSE frames (`event:` lines too) or event objects (Responses) back to bare chunk payloads; an
    error event becomes an exception. Closing this closes vLLM's generator, which aborts the request."""
    async with contextlib.aclosing(frames):
        async for frame in frames:
            if not isinstance(frame, str):
                yield frame.model_dump_json(by_alias=True)
                continue
            payload = sse_payload(frame)
            if payload is not None:
                yield payload
