"""The model server: one Serve deployment per model, each replica hosting one engine behind admission.

The ingress calls `reply` through a Serve handle. A replica runs up to `max_running` requests in its
engine and queues the rest fairly (see admission.py); a whole answer comes back through the handle, a
stream's bytes over a direct connection (stream.py) while the handle call stays open. Serve's health check
watches engine steps, so an engine that is alive but stalled is replaced like a dead one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import ray
from ray import serve

from raylm import _ray, errors, hardware
from raylm.config import ModelConfig
from raylm.contract import NAMED_EVENTS, Call, Direct, Reply, Usage, sse_frames
from raylm.engine import counting
from raylm.engine.protocol import Engine, Meter
from raylm.models import resolve_source
from raylm.serve import resume, status
from raylm.serve.edge import kv_events
from raylm.serve.logs import log_to_stderr
from raylm.serve.metrics import ReplicaMetrics
from raylm.serve.replica.admission import Admission, Turns
from raylm.serve.replica import warm
from raylm.serve.replica.spans import ReplicaSpans
from raylm.serve.stream import StreamHub
from raylm.serve.tracing import Tracing

logger = logging.getLogger("raylm.serve")


def _make_engine(model: ModelConfig, model_dir: str) -> Engine:
    """`model_dir`: the model's source resolved (models.resolve_source), once per replica."""
    from raylm.engine.vllm import VLLMEngine

    return VLLMEngine(model_dir, model.name, model.task, model.engine_args)


def stream_host() -> str:
    """Where this replica's streams wait (and its engine's KV cache events go out): loopback on the head node,
    where every ingress replica runs (a node's Ray address is its public one, even for a cluster started on
    127.0.0.1); else this node's address, which the ingress reaches across the cluster (tickets guard the
    streams; see stream.py)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return "127.0.0.1" if _ray.HEAD_NODE_RESOURCE in node["Resources"] else node["NodeManagerAddress"]


class HeldAdapters:
    """The adapters the engine holds, as its CPU cache of max_cpu_loras keeps them (least recently used out):
    vLLM counts no loads, so this mirror does, for the metrics and `raylm status`."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.loads = capacity, 0
        self._lru: OrderedDict[str, None] = OrderedDict()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._lru)

    def use(self, name: str) -> bool:
        """Record a request for the adapter; True when it had to be loaded."""
        loaded = name not in self._lru
        self._lru[name] = None
        self._lru.move_to_end(name)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        self.loads += loaded
        return loaded


def log_startup(name: str, entered: float, steps: dict[str, float]) -> None:
    """The replica's start-up timeline, one line (benchmarks/cold_start.py reads it): from Ray starting this
    worker process to the replica's `__init__` (the process, Ray's imports, the deployment's), then `steps`
    (the hardware fit, the engine's steps), then the rest of `__init__` (status report, streams, metrics, the
    heap's freeze). On a warm worker (warm.py), from `__init__`: its imports were done before it was needed."""
    born, now = psutil.Process().create_time(), time.time()
    waited = warm.waited_since(entered)
    if waited is None:
        start, origin, phases = born, "its process", {"worker process and imports": entered - born, **steps}
    else:
        start, phases = entered, dict(steps)
        origin = f"its __init__ on a warm worker (imports {warm.preimported[0]:.1f}s, then idle {waited:.0f}s)"
    phases["replica"] = now - start - sum(phases.values())
    logger.info("start-up of %s: %.1fs from %s: %s", name, now - start, origin,
                ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))


class ModelServer:
    """Hosts one engine; the ingress reaches it through `reply` on a Serve handle."""

    async def __init__(self, model: ModelConfig, cache_dir: str, engine_factory=_make_engine,
                       otlp_endpoint: str | None = None) -> None:
        entered = time.time()
        log_to_stderr("vllm", "raylm")
        self.name = model.name
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.tracing = Tracing(otlp_endpoint, f"raylm-{model.name}", {"raylm.replica": self.replica_id})
        if otlp_endpoint and model.task == "generate" and "otlp_traces_endpoint" not in model.engine_args:
            # vLLM's own request span (queue, prefill, decode times as attributes) joins the trace as a child of
            # this replica's span (the traceparent goes to the engine with each request: engine/vllm.py).
            os.environ.update(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
                              OTEL_SERVICE_NAME=f"vllm-{model.name}")
            model = model.model_copy(update={"engine_args": {**model.engine_args,
                                                             "otlp_traces_endpoint": f"{otlp_endpoint}/v1/traces"}})
        self.held = HeldAdapters(model.lora_limits.held)  # the adapters the engine holds, in every report
        await self._report("loading weights")  # for the start-up's live status (runner.py)
        self.admission = Admission(model.admission)
        self.turns = Turns()
        self.max_n = model.admission.max_n or (128 if model.num_gpus else 16)
        self.probe_timeout_s = model.health.probe_timeout_s
        model_dir = resolve_source(model.source, Path(cache_dir))
        fitting = time.time()
        self.fit = hardware.fit(model.engine_args, model.env, model_dir=model_dir)
        fitted = time.time() - fitting
        os.environ.update(self.fit.env)  # read by vLLM here and in the EngineCore process it spawns
        logger.info("%s: %s", model.name, "; ".join(self.fit.notes))
        engine_args = self.fit.engine_args
        self.kv_events = model.routing == "kv" and model.task == "generate"
        if self.kv_events:  # its engine tells every ingress what it caches (serve/edge/kv_events.py)
            engine_args = {"kv_events_config": kv_events.engine_config(), **engine_args}
            os.environ.setdefault("VLLM_HOST_IP", stream_host())  # where its streams wait too
        self.engine: Engine = engine_factory(model.model_copy(update={"engine_args": engine_args}), model_dir)
        await self.engine.start()
        if self.kv_events:
            endpoints = self.engine.kv_events_endpoints()
            if endpoints is None:
                logger.warning("%s: its engine publishes no KV cache events; routed by prompt text", model.name)
            else:
                seed = os.environ.get("PYTHONHASHSEED", kv_events.DEFAULT_SEED)
                algo = str(engine_args.get("prefix_caching_hash_algo", "sha256"))
                await asyncio.to_thread(kv_events.publish, model.name, self.replica_id, endpoints, seed, algo,
                                        model_dir)
        self.streams = StreamHub()
        await self.streams.start(stream_host(), self.replica_id)
        self.metrics = ReplicaMetrics(model.name, self.replica_id)
        self._sampler = asyncio.create_task(self._sample())
        _ray.freeze_heap()
        log_startup(model.name, entered, {"hardware fit (imports torch)": fitted,
                                          **getattr(self.engine, "startup", {})})
        if model.spares:
            warm.ensure_spares_later(model)

    async def _sample(self) -> None:
        """Every second: admission's state to the metrics, and this replica's report for `raylm status`."""
        rate = status.TokenRate()
        while True:
            a = self.admission
            self.metrics.sample(a.running, a.queued, a.queued_tokens)
            await self._report("ready", a.running, a.queued,
                               rate.sample(time.monotonic(), self.engine.generated_tokens))
            await asyncio.sleep(1.0)

    async def _report(self, phase: str, running: int = 0, queued: int = 0, tokens_per_s: float = 0.0) -> None:
        report = {"phase": phase, "running": running, "queued": queued, "tokens_per_s": round(tokens_per_s, 2),
                  "pid": os.getpid(), "adapters": list(self.held.names), "adapter_loads": self.held.loads}
        try:
            await asyncio.to_thread(status.publish, self.name, self.replica_id, report)
        except Exception as exc:  # the status page is not worth a replica: GCS may be busy or restarting
            logger.debug("status report of %s not published: %r", self.name, exc)

    async def reply(self, call: Call) -> AsyncIterator[Reply | Direct | Usage]:
        """One request: a Reply (a whole body and its usage, or an error); or a Direct for a stream, then its
        Usage once it has ended: the call lasts until then, so Serve and admission count it while it runs."""
        rid = call.request_id
        meter = Meter(keep_ids=call.resumable)
        spans = ReplicaSpans(self.tracing, call, self.replica_id) if self.tracing.enabled else None
        try:
            if call.resume is None:
                # Refuse early: a request the queue is sure to refuse costs no counting; a bad request, or a
                # prompt too long for the context, never takes a queue place.
                self.admission.refuse_early(call.tenant)
                endpoint, body = call.endpoint, call.body
            else:  # a stream cut on another replica (resume.py): it goes on from its client's tokens
                endpoint, body = "completions", resume.continuation(call.endpoint, call.body, call.resume)
            if counting.within(body, counting.SMALL_BODY):  # at once, on this loop: cheaper than a turn
                prepared = await self.engine.prepare(endpoint, body, on_loop=True)
            else:  # on the counting thread, tenants in turn: a huge body never holds the streams' loop
                async with self.turns.turn(call.tenant.name):
                    prepared = await self.engine.prepare(endpoint, body)
            if spans is not None:
                spans.phase("prepare", prompt_tokens=prepared.size.total)
            if prepared.sequences > self.max_n:
                raise errors.InvalidRequestError(
                    f"n is {prepared.sequences}; this model takes at most {self.max_n} (admission.max_n)",
                    param="n", code="n_too_large")
            if call.adapter is not None:  # loaded before the request takes a slot: a failed load costs none
                await self.engine.use_adapter(call.adapter)
                if self.held.use(call.adapter.name):
                    self.metrics.adapter_loaded(call.adapter.name)
            async with self.admission.slot(call.tenant, prepared.size.total, prepared.sequences,
                                           first=call.resume is not None):
                if spans is not None:
                    spans.phase("admission wait", tenant=call.tenant.name)
                result = await self.engine.create(prepared, rid, meter, spans and spans.traceparent)
                if isinstance(result, bytes):
                    if spans is not None:
                        spans.end(meter, 200)
                    yield Reply(body=result, usage=meter.usage(self.replica_id))
                    return
                if call.resume is not None:
                    result = resume.rewritten(result, call)
                marks = resume.Marks(meter, call) if call.resumable else None
                direct, out = self.streams.open(sse_frames(result, rid, call.endpoint in NAMED_EVENTS, marks))
                try:
                    yield direct
                    await asyncio.wait({out.task})
                finally:  # also when Serve cancels this call (the client went away)
                    out.abort()
        except Exception as exc:  # refused by admission (429), or the engine failed before answering
            reply = Reply.of(exc, rid)
            if spans is not None:
                spans.end(meter, reply.status, reply.code)
            # (its tokens: none, or those made)
            yield dataclasses.replace(reply, usage=resume.whole_usage(meter.usage(self.replica_id), call.resume))
            return
        if spans is not None:
            spans.end(meter, 200)
        yield resume.whole_usage(meter.usage(self.replica_id), call.resume)

    async def check_health(self) -> None:
        """Serve calls this every period: the engine must be alive and, while it holds requests, finish a
        step within the deadline. A busy engine (a full batch, long prompts) steps, so it stays healthy; a
        stalled one does not. Nothing is queued to find out (a probe request waited behind a full batch)."""
        await self.engine.health()
        stalled = self.engine.stalled_s()
        if stalled > self.probe_timeout_s:
            logger.error("engine of %s made no step in %.0fs with requests in it: reporting unhealthy",
                         self.name, stalled)
            raise RuntimeError(f"engine stalled: no step for {stalled:.0f}s with requests waiting")

    async def describe(self) -> list[str]:
        """What this replica picked for its machine (dtype, thread binding), for the start-up message."""
        return list(self.fit.notes)

    async def ping(self) -> str:
        await self.engine.health()
        return self.name

    async def stats(self) -> dict:
        """This replica's queue and engine, for tests and operators."""
        return {"pid": os.getpid(), "running": self.admission.running, "queued": self.admission.queued,
                "queued_tokens": self.admission.queued_tokens, "rejected": dict(self.admission.rejected),
                "engine_running": self.engine.num_running(), "streams": f"{self.streams.host}:{self.streams.port}",
                "adapters": list(self.held.names), "adapter_loads": self.held.loads}

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown: stop the engine and its EngineCore process.
        if hasattr(self, "streams"):
            await self.streams.close()
        if hasattr(self, "_sampler"):
            self._sampler.cancel()
            try:  # never in the way of stopping the engine below
                await asyncio.to_thread(status.withdraw, self.name, self.replica_id)
                if self.kv_events:
                    await asyncio.to_thread(kv_events.unpublish, self.name, self.replica_id)
            except Exception as exc:
                logger.debug("status report of %s not withdrawn: %r", self.name, exc)
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()
        if hasattr(self, "tracing"):
            self.tracing.shutdown()


ModelDeployment = serve.deployment(ModelServer)
