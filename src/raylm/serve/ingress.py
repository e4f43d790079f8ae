"""The HTTP ingress: OpenAI routes, API keys, tenants, and forwarding to model servers with one retry.

    client ─► Serve proxy ─► Ingress (auth, tenant, model lookup) ─► handle ─► ModelServer replica
                                 ▲ the replica died before answering: once more, on another replica

The ingress holds no engine and little state, so it stays up while models scale (to zero, too) or their
replicas die. Every failure leaves here as one OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from raylm import errors
from raylm.config import ModelConfig
from raylm.engine.protocol import Endpoint
from raylm.serve import http
from raylm.serve.access import Access
from raylm.serve.http import Reply
from raylm.serve.metrics import IngressMetrics

logger = logging.getLogger("raylm.serve")

app = FastAPI(title="raylm", docs_url=None, redoc_url=None)

READY_TIMEOUT_S = 5.0
# The replica (or its node) is gone: the request never ran to the end there, so it may run elsewhere.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


# Module helpers sit above the class: Serve pickles the ingress class by value with the globals it sees.
def _as_api_error(exc: Exception) -> Exception:
    """Serve's own refusals as OpenAI errors; anything else is left to http.api_error (500, hidden)."""
    if isinstance(exc, BackPressureError):
        return errors.OverloadedError("the server is at capacity; retry later", code="queue_full",
                                      retry_after=exc.retry_after_s or 1.0)
    if isinstance(exc, DeploymentUnavailableError):
        return errors.UnavailableError("the model is unavailable: it failed to deploy", retry_after=5.0)
    return exc


def _reason(reply: Reply) -> str | None:
    """A refusal's error code (queue_full, no_replica, ...), for the rejections metric."""
    if reply.status not in (429, 503) or reply.body is None:
        return None
    try:
        return str(json.loads(reply.body)["error"].get("code") or "unavailable")
    except (ValueError, KeyError, TypeError):
        return None


@serve.ingress(app)
class Ingress:
    def __init__(self, models: tuple[ModelConfig, ...], handles: dict[str, Any], access: Access,
                 cold_start_timeout_s: float) -> None:
        self.models = {m.name: m for m in models}
        self.handles = handles
        self.access = access
        self.cold_start_timeout_s = cold_start_timeout_s
        self.created = int(time.time())
        self.metrics = IngressMetrics()

    async def _serve(self, endpoint: Endpoint, request: Request) -> Response:
        start = time.perf_counter()
        rid = http.request_id(request)
        name = "-"  # the metrics' model label: only served names, never what a client made up
        try:
            tenant = self.access.tenant(request.headers)
            body = await http.json_body(request)
            model = self._model(endpoint, body)
            name = model.name
            head, rest = await self._open(model, (endpoint, body, rid, tenant))
        except Exception as exc:
            head = http.error_reply(_as_api_error(exc), rid)
        if head.body is not None:
            self.metrics.answered(name, endpoint, head.status, start, _reason(head))
            return http.json_response(head)
        return http.sse_response(self.metrics.timed(rest, name, endpoint, start), rid)

    def _model(self, endpoint: Endpoint, body: dict) -> ModelConfig:
        name = body.get("model")
        if name is None:
            wanted = "embed" if endpoint == "embeddings" else "generate"
            name = next((m.name for m in self.models.values() if m.task == wanted), next(iter(self.models)))
            body["model"] = name
        if not isinstance(name, str):
            raise errors.InvalidRequestError("model must be a string", param="model", code="invalid_type")
        if name not in self.models:
            raise errors.NotFoundError(
                f"The model `{name}` does not exist. Served models: {', '.join(self.models)}.",
                param="model", code="model_not_found")
        return self.models[name]

    async def _open(self, model: ModelConfig, args: tuple) -> tuple[Reply, Any]:
        """Send the request; if its replica dies before the first reply, send it once more."""
        for attempt in (1, 2):
            replies = self.handles[model.name].options(stream=True).reply.remote(*args)
            try:
                await self._assigned(replies, model)
                return await replies.__anext__(), replies
            except _REPLICA_GONE as exc:
                if attempt == 2:
                    raise errors.UnavailableError(
                        f"model {model.name}: the replica serving this request died, twice",
                        retry_after=model.admission.retry_after_s) from exc
                logger.warning("request %s: replica of %s died before answering; retrying once",
                               args[2], model.name)
        raise AssertionError("unreachable")

    async def _assigned(self, replies: Any, model: ModelConfig) -> None:
        """Wait (bounded) until a replica takes the request: during a cold start there is none yet."""
        # Serve resolves this future once its router has picked a replica; a timeout here means no replica
        # took the request, so nothing ran and a 503 is honest.
        try:
            await asyncio.wait_for(asyncio.shield(replies._fetch_future_result_async()),
                                   self.cold_start_timeout_s)
        except TimeoutError:
            replies.cancel()
            raise errors.UnavailableError(
                f"no replica of model {model.name} took the request within {self.cold_start_timeout_s:.0f}s",
                code="no_replica", retry_after=model.admission.retry_after_s) from None

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
    async def list_models(self, request: Request) -> Response:
        try:
            self.access.tenant(request.headers)
        except errors.APIError as exc:
            return http.json_response(http.error_reply(exc, http.request_id(request)))
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "raylm"}
            for name in self.models]})

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready when every model that keeps replicas answers a ping; a model scaled to zero counts as ready."""
        names = list(self.models)
        results = await asyncio.gather(*(self._ping(n) for n in names), return_exceptions=True)
        status = {n: "ready" if r is True else "unavailable" for n, r in zip(names, results)}
        ok = all(s == "ready" for s in status.values())
        return JSONResponse({"status": "ready" if ok else "unavailable", "models": status},
                            status_code=200 if ok else 503)

    async def _ping(self, name: str) -> bool:
        scaling = self.models[name].autoscaling
        if scaling is not None and scaling.min_replicas == 0:
            return True
        try:
            await asyncio.wait_for(self.handles[name].ping.remote(), READY_TIMEOUT_S)
        except BackPressureError:  # busy is alive
            pass
        return True


IngressDeployment = serve.deployment(Ingress)
