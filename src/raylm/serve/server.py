"""The model server: one Serve deployment per model, each replica hosting one engine behind admission.

The ingress calls `reply` through a Serve handle. A replica runs up to `max_running` requests in its
engine and queues the rest fairly (see admission.py); Serve's health check runs a real one-token request,
so an engine that is alive but stalled is replaced like a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from raylm.config import ModelConfig
from raylm.engine.protocol import Endpoint, Engine
from raylm.models import resolve_source
from raylm.serve import http
from raylm.serve.admission import Admission, Tenant
from raylm.serve.http import Reply, StreamError
from raylm.serve.metrics import ReplicaMetrics

logger = logging.getLogger("raylm.serve")


def _make_engine(model: ModelConfig, cache_dir: Path) -> Engine:
    from raylm.engine.vllm import VLLMEngine

    return VLLMEngine(resolve_source(model.source, cache_dir), model.name, model.task, model.engine_args)


class ModelServer:
    """Hosts one engine; the ingress reaches it through `reply` on a Serve handle."""

    async def __init__(self, model: ModelConfig, cache_dir: str, engine_factory=_make_engine) -> None:
        self.name = model.name
        self.admission = Admission(model.admission)
        self.probe_timeout_s = model.health.probe_timeout_s
        self.engine: Engine = engine_factory(model, Path(cache_dir))
        await self.engine.start()
        self.metrics = ReplicaMetrics(model.name, serve.get_replica_context().replica_id.unique_id)
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            a = self.admission
            self.metrics.sample(a.running, a.queued, a.queued_tokens)
            await asyncio.sleep(1.0)

    async def reply(self, endpoint: Endpoint, body: dict, rid: str,
                    tenant: Tenant = Tenant()) -> AsyncIterator[Reply | str | StreamError]:
        """One request: a Reply first (a whole body, or `body=None` when chunk payloads follow)."""
        try:
            async with self.admission.slot(tenant, lambda: self.engine.prompt_tokens(endpoint, body)):
                async for item in self._run(endpoint, body, rid):
                    yield item
        except Exception as exc:  # refused by admission (429), or the engine failed before answering
            yield http.error_reply(exc, rid)

    async def _run(self, endpoint: Endpoint, body: dict, rid: str) -> AsyncIterator[Reply | str | StreamError]:
        result = await self.engine.create(endpoint, body, rid)  # raising here: `reply` answers with the error
        if isinstance(result, bytes):
            yield Reply(body=result)
            return
        yield Reply()
        try:
            async for payload in result:
                yield payload
        except Exception as exc:
            yield StreamError(http.api_error(exc, rid).body())

    async def check_health(self) -> None:
        """Serve calls this every period: the engine must answer a one-token request within the deadline."""
        await self.engine.health()
        endpoint: Endpoint = "embeddings" if "embeddings" in self.engine.endpoints else "completions"
        body = {"model": self.name, "input": "ok"} if endpoint == "embeddings" else {
            "model": self.name, "prompt": "ok", "max_tokens": 1}
        try:
            await asyncio.wait_for(self.engine.create(endpoint, body, f"health-{uuid.uuid4().hex}"),
                                   self.probe_timeout_s)
        except TimeoutError:
            logger.error("engine of %s produced no token in %.0fs: reporting unhealthy", self.name,
                         self.probe_timeout_s)
            raise RuntimeError(f"engine stalled: no answer to a one-token probe in {self.probe_timeout_s}s")

    async def ping(self) -> str:
        await self.engine.health()
        return self.name

    async def stats(self) -> dict:
        """This replica's queue and engine, for tests and operators."""
        return {"pid": os.getpid(), "running": self.admission.running, "queued": self.admission.queued,
                "queued_tokens": self.admission.queued_tokens, "rejected": dict(self.admission.rejected),
                "engine_running": self.engine.num_running()}

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown: stop the engine and its EngineCore process.
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()


ModelDeployment = serve.deployment(ModelServer)
