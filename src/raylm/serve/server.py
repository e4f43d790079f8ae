"""The model server: one Serve deployment per model, each replica hosting one engine.

The first model's server is also the HTTP ingress: requests for it are served in place (proxy → replica,
one hop), requests for other models are forwarded through Serve handles. Every Serve hop costs CPU
(~11 ms per request here), so the common path pays for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from raylm import errors
from raylm.config import ModelConfig
from raylm.engine.protocol import Endpoint, Engine
from raylm.models import resolve_source
from raylm.serve import http
from raylm.serve.http import Reply, StreamError

logger = logging.getLogger("raylm.serve")

app = FastAPI(title="raylm", docs_url=None, redoc_url=None)

READY_TIMEOUT_S = 5.0


def _make_engine(model: ModelConfig, cache_dir: Path) -> Engine:
    from raylm.engine.vllm import VLLMEngine

    return VLLMEngine(resolve_source(model.source, cache_dir), model.name, model.task, model.engine_args)


class ModelServer:
    """Hosts one engine; other model servers reach it through `reply` on a Serve handle."""

    async def __init__(self, model: ModelConfig, cache_dir: str, engine_factory=_make_engine) -> None:
        self.name = model.name
        self.engine: Engine = engine_factory(model, Path(cache_dir))
        await self.engine.start()

    async def check_health(self) -> None:
        await self.engine.health()

    async def ping(self) -> str:
        await self.engine.health()
        return self.name

    async def reply(self, endpoint: Endpoint, body: dict, rid: str) -> AsyncIterator[Reply | str | StreamError]:
        """One request on this replica's engine: a Reply first, then (for a stream) chunk payloads."""
        try:
            result = await self.engine.create(endpoint, body, rid)
        except Exception as exc:
            yield http.error_reply(exc, rid)
            return
        if isinstance(result, bytes):
            yield Reply(body=result)
            return
        yield Reply()
        try:
            async for payload in result:
                yield payload
        except Exception as exc:
            yield StreamError(http.api_error(exc, rid).body())

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown: stop the engine and its EngineCore process.
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()


@serve.ingress(app)
class OpenAIServer(ModelServer):
    """A model server that is also the app's HTTP ingress (Serve allows one FastAPI deployment per app)."""

    async def __init__(self, model: ModelConfig, cache_dir: str, catalog: dict[str, str],
                       peers: dict[str, Any], engine_factory=_make_engine) -> None:
        """`catalog` maps every served model name to its task; `peers` holds handles to the others."""
        self.catalog = catalog
        self.peers = peers
        self.created = int(time.time())
        await super().__init__(model, cache_dir, engine_factory)

    def _route(self, endpoint: Endpoint, body: dict, rid: str) -> AsyncIterator[Reply | str | StreamError]:
        name = body.get("model")
        if name is None:
            name = next((n for n, task in self.catalog.items() if (task == "embed") == (endpoint == "embeddings")),
                        self.name)
            body["model"] = name
        if not isinstance(name, str):
            raise errors.InvalidRequestError("model must be a string", param="model", code="invalid_type")
        if name == self.name:
            return self.reply(endpoint, body, rid)
        if name in self.peers:
            return self.peers[name].options(stream=True).reply.remote(endpoint, body, rid)
        raise errors.NotFoundError(
            f"The model `{name}` does not exist. Served models: {', '.join(self.catalog)}.",
            param="model", code="model_not_found")

    async def _serve(self, endpoint: Endpoint, request: Request) -> Response:
        rid = http.request_id(request)
        try:
            replies = self._route(endpoint, await http.json_body(request), rid)
            head = await replies.__anext__()
        except Exception as exc:
            return http.json_response(http.error_reply(exc, rid))
        if head.body is not None:
            return http.json_response(head)
        return http.sse_response(replies, rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", request)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._serve("embeddings", request)

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "raylm"}
            for name in self.catalog]}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready when every model answers a ping: its replicas are up and their engines healthy."""
        names = list(self.catalog)
        results = await asyncio.gather(*(self._ping(n) for n in names), return_exceptions=True)
        status = {n: "ready" if r is True else "unavailable" for n, r in zip(names, results)}
        ok = all(s == "ready" for s in status.values())
        return JSONResponse({"status": "ready" if ok else "unavailable", "models": status},
                            status_code=200 if ok else 503)

    async def _ping(self, name: str) -> bool:
        if name == self.name:
            await self.engine.health()
        else:
            await asyncio.wait_for(self.peers[name].ping.remote(), READY_TIMEOUT_S)
        return True


ModelDeployment = serve.deployment(ModelServer)
IngressDeployment = serve.deployment(OpenAIServer)
