"""The HTTP ingress: OpenAI routes, API keys, tenants, and forwarding to model servers with one retry.

    client ─► Ingress replica (its own HTTP server: auth, tenant, model lookup)
                 ├─ handle call (Serve) ─► ModelServer replica: admission, engine      (routing, counting)
                 └─ a stream's bytes ◄── direct connection ── the same replica          (stream.py)
              ▲ the replica died before answering: once more, on another replica

The ingress replica serves HTTP itself on `serve.host:serve.port` (Serve's HTTP proxy is not on the path):
a token crosses one process boundary, model replica → ingress, as bytes on a socket rather than a Ray
message. The ingress holds no engine and little state, so it stays up while models scale (to zero, too) or
their replicas die. Every failure leaves here as one OpenAI error body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from raylm import _ray, errors
from raylm.config import ModelConfig, ServeConfig
from raylm.contract import (INGRESS_NAME, NAMED_EVENTS, PATHS, TASK_ENDPOINTS, Adapter, Call, Endpoint, Reply, Usage,
                            UsageRecord, deployment_name, error_event)
from raylm.serve import resume, status, stream
from raylm.serve.batch.store import Store
from raylm.serve.edge import http
from raylm.serve.edge.access import Access
from raylm.serve.edge.adapters import Adapters
from raylm.serve.edge.routes import build_api
from raylm.serve.edge.spans import RequestSpans
from raylm.serve.logs import log_to_stderr
from raylm.serve.metrics import IngressMetrics
from raylm.serve.tracing import Tracing
from raylm.serve.usage.sink import UsageSink, reserve_tokens
from raylm.serve.usage.store import parse_query

logger = logging.getLogger("raylm.serve")

READY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
QUOTA_TIMEOUT_S = 5.0
USAGE_WAIT_S = 30.0  # for a finished stream's Usage (its replica ends the stream first, then sends it)
# The replica (or its node) is gone: the request never ran to the end there, so it may run elsewhere.
# OSError: its stream's connection was refused or reset before a byte came.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, OSError)
# Endpoints whose requests vLLM caches by prefix, and which take a cache_salt.
SALTED: frozenset[Endpoint] = frozenset({"chat", "completions", "responses", "messages"})


class CacheSalt:
    """A tenant's salt: HMAC of its name under a secret no client knows, so no tenant can name another's
    salt; a salt the client sent is kept behind it (its own caches stay apart within the tenant)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def of(self, tenant: str, client_salt: Any) -> str:
        mine = hmac.new(self.secret, tenant.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{mine}/{client_salt}" if isinstance(client_salt, str) and client_salt else mine


def _as_api_error(exc: Exception) -> Exception:
    """Serve's own refusals as OpenAI errors; anything else is left to errors.public_error (500, hidden)."""
    if isinstance(exc, BackPressureError):
        return errors.OverloadedError("the server is at capacity; retry later", code="queue_full",
                                      retry_after=exc.retry_after_s or 1.0)
    if isinstance(exc, DeploymentUnavailableError):
        return errors.UnavailableError("the model is unavailable: it failed to deploy", retry_after=5.0)
    return exc


@dataclass
class Seen:
    """What the ingress learns of a request as it goes: its usage record and its answer's headers."""

    time: float  # when it came in: Unix seconds
    start: float  # and by time.perf_counter()
    request_id: str
    endpoint: Endpoint
    tenant: str = "-"
    key_id: str = ""
    model: str = ""
    adapter: str = ""
    ticket: int = 0  # its quota reservation
    trace_id: str = ""
    resumes: int = 0  # its stream went on on another replica (resume.py)
    replica: str = ""  # the replica its stream comes from
    headers: dict[str, str] = field(default_factory=dict)
    spans: RequestSpans | None = None  # tracing on

    @property
    def label(self) -> str:
        """The metrics' model label: only served names, never what a client made up."""
        return self.adapter or self.model or "-"

    def trace(self, spans: RequestSpans) -> None:
        self.spans, self.trace_id = spans, spans.trace_id
        if spans.traceparent:
            self.headers["traceparent"] = spans.traceparent

    def phase(self, name: str) -> None:
        if self.spans is not None:
            self.spans.phase(name)


class Ingress:
    async def __init__(self, models: tuple[ModelConfig, ...], handles: dict[str, Any], access: Access,
                       config: ServeConfig, batch_jobs: Any, ledger: Any = None) -> None:
        """`config`: serve.*, with batch_dir resolved and without keys (those reach it hashed, in `access`)."""
        log_to_stderr("raylm")  # INFO and above of raylm's loggers into this replica's log file
        self.models = {m.name: m for m in models}
        self.handles = handles
        self.batch_jobs = batch_jobs
        self.batch_store = Store(Path(config.batch_dir))
        self.callers = {name: h.options(stream=True) for name, h in handles.items()}
        self.access = access
        self.config = config
        self.created = int(time.time())
        self.metrics = IngressMetrics()
        # With keys, each tenant's prefix cache is its own (vLLM's cache_salt): TTFT tells no tenant what another
        # asked. The salt's secret is made when the app is built (access.salt_secret), shared by every ingress.
        self.salt = CacheSalt(access.salt_secret) if access.keyed and config.cache_salt else None
        self.adapters = Adapters(models, serve.get_replica_context().app_name)
        self.tracing = Tracing(config.otlp_endpoint, "raylm-ingress")
        # Usage and quotas through the Ledger (usage/ledger.py), when usage is kept.
        self.ledger = ledger
        self.limited = frozenset(n for n, t in config.tenants.items() if t.limited) if ledger else frozenset()
        self.usage = UsageSink(ledger, config.usage.flush_interval_s, config.usage.max_buffered) if ledger else None
        self.http_server = await http.serve_http(build_api(self), config.host, config.port, config.http)
        _ray.freeze_heap()

    async def serve(self, endpoint: Endpoint, request: Request) -> Response:
        start = time.perf_counter()
        rid = http.request_id(request)
        seen = Seen(time.time(), start, rid, endpoint)
        if self.tracing.enabled:
            seen.trace(RequestSpans(self.tracing, request.headers.get("traceparent"), f"POST {request.url.path}",
                                    endpoint, start))
        try:
            caller = self.access.caller(request.headers)
            seen.tenant, seen.key_id = caller.tenant.name, caller.key_id
            seen.phase("auth")
            body = await http.json_body(request, self.config.max_request_bytes, self.config.http.body_timeout_s)
            model, adapter = await self._model(endpoint, body)
            seen.model, seen.adapter = model.name, adapter.name if adapter is not None else ""
            seen.phase("read body")
            await self._admit(seen, body)
            if self.salt is not None and endpoint in SALTED:
                body["cache_salt"] = self.salt.of(caller.tenant.name, body.get("cache_salt"))
            call = Call(endpoint, body, rid, caller.tenant, adapter, caller.key_id,
                        resumable=self.config.resume_streams and resume.why_not(
                            endpoint, body, model.reasoning_parser) is None)
            head = await self._open(model, call, seen)
        except Exception as exc:
            head = Reply.of(_as_api_error(exc), rid)
        if isinstance(head, Reply):
            self.metrics.answered(seen.label, endpoint, head.status, start, head.code, seen.tenant)
            self._record(seen, head.status, head.code, head.usage, None, time.perf_counter())
            return http.json_response(head, rid, seen.headers)
        return http.sse_response(self._relay(head, seen, call), rid, seen.headers)

    async def _admit(self, seen: Seen, body: dict) -> None:
        """A tenant with quotas asks the Ledger (one for the service) before its request goes anywhere."""
        if seen.tenant not in self.limited:
            return
        try:
            decision = await asyncio.wait_for(self.ledger.admit.remote(seen.tenant, reserve_tokens(body)),
                                              QUOTA_TIMEOUT_S)
        except Exception as exc:  # fail closed: a quota that cannot be checked is not a free pass
            logger.warning("quota check for a request failed: %r", exc)
            raise errors.UnavailableError("quotas cannot be checked right now; retry later",
                                          code="quota_unavailable", retry_after=1.0) from None
        seen.headers.update(decision.headers)
        seen.phase("quota")
        if not decision.allowed:
            kind = errors.QuotaExceededError if decision.code == "insufficient_quota" else errors.RateLimitError
            raise kind(decision.message, code=decision.code, retry_after=decision.retry_after_s)
        seen.ticket = decision.ticket

    def _record(self, seen: Seen, status: int, code: str | None, usage: Usage | None, ttft_s: float | None,
                end: float, stream: bool = False) -> None:
        """The request ended at `end` (perf_counter): its usage record, its trace's last spans."""
        if seen.spans is not None:
            seen.spans.end(status, usage, stream, code, end, seen.tenant, ttft_s)
        if self.usage is None:
            return
        u = usage or Usage()
        self.usage.add(UsageRecord(
            seen.time, seen.request_id, seen.tenant, seen.key_id, seen.model, seen.adapter, seen.endpoint, status,
            code or "", u.prompt_tokens, u.cached_tokens, u.completion_tokens, ttft_s, end - seen.start,
            replica=u.replica, trace_id=seen.trace_id, resumes=seen.resumes), seen.ticket)

    async def _model(self, endpoint: Endpoint, body: dict) -> tuple[ModelConfig, Adapter | None]:
        """The model a request names, and the adapter of it when the name is an adapter's."""
        name = body.get("model")
        if name is None:
            name = next((m.name for m in self.models.values() if endpoint in TASK_ENDPOINTS[m.task]),
                        next(iter(self.models)))
            body["model"] = name
        if not isinstance(name, str):
            raise errors.InvalidRequestError("model must be a string", param="model", code="invalid_type")
        if name in self.models:
            model, adapter = self.models[name], None
        else:
            found = await self.adapters.find(name)
            if found is None or found[0] not in self.models:  # (a run-time adapter of a model since removed)
                raise _no_model(name, self.models)
            model, adapter = self.models[found[0]], found[1]
        if endpoint not in TASK_ENDPOINTS[model.task]:
            raise errors.InvalidRequestError(f"model {name!r} does not serve {PATHS[endpoint][0]}",
                                             param="model", code="unsupported_endpoint")
        return model, adapter

    async def _open(self, model: ModelConfig, call: Call, seen: Seen,
                    traced: bool = True) -> Reply | tuple[AsyncIterator[bytes], Any]:
        """Send the request; if its replica dies before the first reply, send it once more. A stream: its bytes,
        and the call, whose last item (its Usage) comes when the stream has ended."""
        spans = seen.spans if traced else None
        for attempt in (1, 2):
            if spans is not None:
                call = dataclasses.replace(call, trace=spans.forward(model.name))
            replies = self.callers[model.name].reply.remote(call)
            try:
                await self._assigned(replies, model)
                if spans is not None:
                    spans.routed()
                head = await replies.__anext__()
                if isinstance(head, Reply):
                    return head
                seen.replica = head.replica
                return stream.receive(*await stream.connect(head, CONNECT_TIMEOUT_S)), replies
            except _REPLICA_GONE as exc:
                if spans is not None:
                    spans.forwarded(error="the replica died")
                replies.cancel()
                if attempt == 2:
                    raise errors.UnavailableError(
                        f"model {model.name}: the replica serving this request died, twice",
                        retry_after=model.admission.retry_after_s) from exc
                logger.warning("request %s: replica of %s died before answering; retrying once",
                               call.request_id, model.name)
            finally:
                if spans is not None:
                    spans.forwarded()  # (once: a span ended above stays so)
        raise AssertionError("unreachable")

    async def _assigned(self, replies: Any, model: ModelConfig) -> None:
        """Wait (bounded) until a replica takes the request: during a cold start there is none yet."""
        # Serve resolves this future once its router has picked a replica; a timeout here means no replica
        # took the request, so nothing ran and a 503 is honest.
        timeout_s = self.config.cold_start_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(_ray.assigned(replies)), timeout_s)
        except TimeoutError:
            replies.cancel()
            raise errors.UnavailableError(
                f"no replica of model {model.name} took the request within {timeout_s:.0f}s",
                code="no_replica", retry_after=model.admission.retry_after_s) from None

    async def _relay(self, head: tuple[AsyncIterator[bytes], Any], seen: Seen, call: Call) -> AsyncIterator[bytes]:
        """A stream's bytes to the client as they come. One cut short (its replica died) goes on from where the
        client is on another replica when it can (resume.py), and else ends with one error event."""
        chunks, replies = head
        start = seen.start
        timer = self.metrics.stream(seen.label, seen.endpoint, start, seen.tenant)
        status, code = 499, "client_gone"  # unless it ends otherwise: the client went away
        relayed = resume.Relayed() if call.resumable else None
        try:
            while True:
                try:
                    async for chunk in chunks:
                        if relayed is not None and not (chunk := relayed.feed(chunk)):
                            continue
                        timer.chunk()
                        yield chunk
                    status, code = 200, None
                    break
                except stream.StreamCut:
                    failed: Exception = errors.UnavailableError(
                        f"the replica of model {seen.label} serving this stream stopped before the stream ended",
                        code="replica_lost", retry_after=self.models[seen.model].admission.retry_after_s)
                    if relayed is not None and seen.resumes < resume.MAX_RESUMES:
                        seen.resumes += 1
                        replies.cancel()
                        head = await self._resume(call, relayed, seen)
                        if not isinstance(head, Exception):
                            chunks, replies = head
                            continue
                        failed = head
                    status, code = 500, getattr(failed, "code", None) or "replica_lost"
                    yield error_event(failed, seen.request_id, seen.endpoint in NAMED_EVENTS).encode()
                    break
        finally:  # closing the connection (the client went away) aborts the engine request
            timer.end(status)
            ttft = timer.first - start if timer.chunks else None
            # The call's last item, the stream's Usage, comes once the replica has ended it: not awaited here.
            asyncio.get_running_loop().create_task(
                self._stream_usage(replies, seen, status, code, ttft, time.perf_counter()))

    async def _resume(self, call: Call, relayed: resume.Relayed,
                      seen: Seen) -> tuple[AsyncIterator[bytes], Any] | Exception:
        """Continue a cut stream on another replica: its new bytes and call, or the error to end it with."""
        model = self.models[seen.model]
        at = relayed.resume()  # None: the client has no event yet, so the request goes again as it was
        try:
            # Not to the replica that cut it: Serve's router may not know yet that it died (a stream's cut is
            # seen at once; the actor's death reaches the router later), and twice there fails the stream.
            head = await self._open(model, dataclasses.replace(call, resume=at, avoid=seen.replica), seen,
                                    traced=False)
        except Exception as exc:
            head = Reply.of(_as_api_error(exc), call.request_id)
        if isinstance(head, Reply):
            logger.warning("request %s: its stream was cut and could not be resumed: %s", call.request_id, head.code)
            self.metrics.resumed(seen.label, ok=False)
            return errors.UnavailableError(
                f"the replica of model {seen.label} serving this stream stopped, and the stream could not go on "
                f"elsewhere ({head.message or head.code})", code="replica_lost",
                retry_after=model.admission.retry_after_s)
        logger.warning("request %s: its stream was cut after %d tokens; resumed on another replica",
                       call.request_id, len(at.output_ids) if at else 0)
        self.metrics.resumed(seen.label, ok=True)
        return head

    async def _stream_usage(self, replies: Any, seen: Seen, status: int, code: str | None, ttft_s: float | None,
                            end: float) -> None:
        usage = None
        try:
            usage = await asyncio.wait_for(replies.__anext__(), USAGE_WAIT_S)
        except Exception as exc:  # the replica died with the stream: its tokens are not known
            logger.debug("request %s: no usage from its replica: %r", seen.request_id, exc)
        self._record(seen, status, code, usage if isinstance(usage, Usage) else None, ttft_s, end, stream=True)

    async def list_models(self, request: Request, model_id: str | None = None) -> Response:
        """GET /v1/models, or one model's card (GET /v1/models/{id}: the OpenAI SDK's models.retrieve)."""
        rid = http.request_id(request)
        try:
            self.access.tenant(request.headers)
        except errors.APIError as exc:
            return http.error_response(exc, rid)
        # `task` is raylm's: which endpoints a model serves (the playground picks its chat models by it).
        # An adapter's card names its base in `parent`, as vLLM's does.
        adapters = await self.adapters.current()
        cards = []
        for name, m in self.models.items():
            cards.append({"id": name, "object": "model", "created": self.created, "owned_by": "raylm", "task": m.task})
            cards += [{"id": adapter, "object": "model", "created": self.created, "owned_by": "raylm",
                       "task": m.task, "parent": name} for adapter, (base, _) in adapters.items() if base == name]
        if model_id is not None:
            card = next((c for c in cards if c["id"] == model_id), None)
            return JSONResponse(card) if card else http.error_response(_no_model(model_id, self.models), rid)
        return JSONResponse({"object": "list", "data": cards})

    async def change_adapters(self, request: Request, load: bool) -> Response:
        """POST /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's bodies; `model` names the base when
        several models take run-time adapters): an admin key only; see adapters.py."""
        rid = http.request_id(request)
        try:
            if not self.access.caller(request.headers).admin:
                raise errors.PermissionDeniedError("loading and unloading adapters needs an admin key",
                                                   code="admin_only")
            body = await http.json_body(request, 64 * 1024, self.config.http.body_timeout_s)
            name, path, base = body.get("lora_name"), body.get("lora_path"), body.get("model")
            for field, value in (("lora_name", name), ("lora_path", path if load else ""), ("model", base or "")):
                if not isinstance(value, str) or (field == "lora_name" and not value):
                    raise errors.InvalidRequestError(f"{field} must be a non-empty string", param=field)
            if load:
                await self.adapters.load(name, path, base)
                message = f"Success: LoRA adapter '{name}' added successfully."
            else:
                await self.adapters.unload(name)
                message = f"Success: LoRA adapter '{name}' removed successfully."
        except Exception as exc:
            return http.error_response(exc, rid)
        logger.info("adapter %s %s by an admin", name, "registered" if load else "removed")
        return Response(message, media_type="text/plain")

    async def status(self, request: Request) -> Response:
        """GET /status (behind the API key): the service at a glance, every tenant's for an admin key, the
        caller's own tenant's otherwise; see status.py."""
        rid = http.request_id(request)
        try:
            caller = self.access.caller(request.headers)
        except errors.APIError as exc:
            return http.error_response(exc, rid)
        deployments = {name: deployment_name(name) for name in self.models}
        app_name = serve.get_replica_context().app_name
        tenant = None if caller.admin else caller.tenant.name
        adapters = {name: base for name, (base, _) in (await self.adapters.current()).items()}
        body = await status.collect(app_name, deployments, self.metrics.window, tenant, adapters)
        if self.ledger is not None:
            try:
                quotas = (await asyncio.wait_for(self.ledger.quota_status.remote(), QUOTA_TIMEOUT_S))["quotas"]
            except Exception as exc:  # the page without quotas beats no page
                logger.warning("quota use not in /status: %r", exc)
                quotas = {}
            body["quotas"] = {t: q for t, q in quotas.items() if tenant is None or t == tenant}
        return JSONResponse(body)

    async def usage_page(self, request: Request, kind: str) -> Response:
        """GET /v1/organization/usage/{completions,embeddings}: OpenAI's usage API, every tenant's for an admin
        key (group_by=project_id: by tenant), the caller's own tenant's otherwise."""
        rid = http.request_id(request)
        try:
            caller = self.access.caller(request.headers)
            if self.ledger is None:
                raise errors.NotFoundError("usage is not kept on this server (serve.usage.enabled: false)",
                                           code="usage_disabled")
            params = {k: request.query_params.getlist(k) for k in request.query_params}
            query = parse_query(kind, params, None if caller.admin else caller.tenant.name)
            await self.usage.flush()  # this replica's last second too
            return JSONResponse(await self.ledger.usage.remote(query))
        except Exception as exc:
            return http.error_response(exc, rid)

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

    async def check_health(self) -> None:
        if self.http_server.task.done():
            raise RuntimeError("the ingress HTTP server has stopped")

    async def __del__(self) -> None:
        server = getattr(self, "http_server", None)
        if server is not None:
            # Serve stops this replica before its successor (a rolling update) serves the port: keep taking
            # connections until another ingress replica runs (or the app is being deleted), drain_s at most,
            # then stop taking them and let the requests in flight finish: drain_s more at most, and a cold
            # start's wait (a one-replica model is replaced stop-first by Serve: its requests wait meanwhile).
            app_name, drain_s = serve.get_replica_context().app_name, self.config.drain_s
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and not await _successor_or_leaving(app_name):
                await asyncio.sleep(0.5)
            server.should_exit = True
            await asyncio.wait({server.task}, timeout=drain_s + self.config.cold_start_timeout_s)
        if getattr(self, "usage", None) is not None:
            await self.usage.close()
        if hasattr(self, "tracing"):
            self.tracing.shutdown()


async def _successor_or_leaving(app_name: str) -> bool:
    """Whether another ingress replica serves the port, or the whole application is going (or Serve's
    controller cannot say): then an ingress replica that is stopping has nobody to wait for."""
    def look() -> bool:
        app = _ray.serve_app(app_name)
        if app is None or app.status == "DELETING":
            return True
        ingress = app.deployments.get(INGRESS_NAME)
        return ingress is None or ingress.replica_states.get("RUNNING", 0) > 0

    try:
        return await asyncio.wait_for(asyncio.to_thread(look), 2.0)
    except Exception:
        return True


def _no_model(name: str, models: dict[str, ModelConfig]) -> errors.APIError:
    return errors.NotFoundError(f"The model `{name}` does not exist. Served models: {', '.join(models)} "
                                "(and their adapters: GET /v1/models).", param="model", code="model_not_found")


IngressDeployment = serve.deployment(Ingress)
