"""The Ledger: one replica on the head node that keeps usage, enforces quotas and writes the access log.

    ingress replicas ── admit(tenant, reserve) ──► Quotas (one for the service: limits hold across replicas)
    ingress replicas, Batch API stages ── record(records, settles) ──► Quotas.settle · access log · metrics
                                                                       · buffer ──every flush_interval_s──► store
    GET /v1/organization/usage/* ── usage(query) ──► store (after writing what is buffered)

Only tenants with quotas call `admit`: a service without quotas pays one list append per request (the sink)
and nothing on the request path. The database is written on a thread: a slow or absent one never delays an
answer; records wait in the buffer (bounded by usage.max_buffered, the oldest dropped past it and counted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray import serve
from ray.util import metrics

from raylm import _ray, errors
from raylm.config import ServeConfig
from raylm.contract import UsageRecord
from raylm.serve.logs import log_to_stderr
from raylm.serve.usage.quota import DAY_S, Decision, Limits, Quotas

logger = logging.getLogger("raylm.serve")

ACCESS_LOG = "access.log"
WRITE_BATCH = 5000  # records per database transaction
RECONNECT_S = 10.0
OTHER = "other"  # the metrics' tenant label for tenants the config does not name (bounded labels)


def access_log_path() -> Path:
    """Where the access log is: the Ray session's log folder, raylm/access.log (on the head node)."""
    return Path(_ray.session_log_dir()) / "raylm" / ACCESS_LOG


def access_line(record: UsageRecord) -> str:
    """One request as the access log writes it: never a prompt, an output or a key."""
    when = datetime.fromtimestamp(record.time, timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({
        "time": when.replace("+00:00", "Z"), "request_id": record.request_id, "trace_id": record.trace_id or None,
        "tenant": record.tenant, "key_id": record.key_id or None, "model": record.model or None,
        "adapter": record.adapter or None, "route": record.route, "status": record.status,
        "error_code": record.error_code or None, "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens, "completion_tokens": record.completion_tokens,
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 1),
        "duration_ms": round(record.duration_s * 1000, 1), "replica": record.replica or None,
        "batch": record.batch, "resumes": record.resumes}, separators=(",", ":"))


class Ledger:
    async def __init__(self, config: ServeConfig, known_tenants: tuple[str, ...]) -> None:
        """`config`: serve.* with cache_dir resolved; `known_tenants`: the tenants keys and the config name."""
        log_to_stderr("raylm")
        self.config = config.usage
        self.url = config.usage_database
        self.quotas = Quotas({name: Limits(t.requests_per_minute, t.tokens_per_minute, t.tokens_per_day)
                              for name, t in config.tenants.items() if t.limited})
        self.known = frozenset(known_tenants) | frozenset(config.tenants)
        self.pending: deque[UsageRecord] = deque()
        self.dropped = 0
        self.store: Any = None
        await self._connect(required=self.config.required)
        self.access = _access_logger(config) if config.access_log.enabled else None
        self._metrics()
        self._writer = asyncio.create_task(self._write_loop())

    async def _connect(self, required: bool) -> None:
        from raylm.serve.usage.store import UsageStore

        try:
            self.store = await asyncio.to_thread(UsageStore, self.url)
        except errors.ConfigError as exc:
            if required:
                raise
            logger.warning("usage: %s; usage is buffered until the database can be reached", exc)
            return
        now = time.time()
        self.quotas.restore_day(await asyncio.to_thread(self.store.tokens_since, now - now % DAY_S), now)

    def _metrics(self) -> None:
        keys = ("tenant", "model")
        self.m_tokens = metrics.Counter("raylm_usage_tokens_total", "Tokens by tenant, model and kind "
                                        "(prompt, cached, completion).", tag_keys=(*keys, "kind"))
        self.m_requests = metrics.Counter("raylm_usage_requests_total", "Requests by tenant, model and status.",
                                          tag_keys=(*keys, "status"))
        self.m_dropped = metrics.Counter("raylm_usage_dropped_total", "Usage records dropped (buffer full).")
        self.m_quota = metrics.Gauge("raylm_quota_used_ratio", "A limited tenant's use of each limit (1 = all).",
                                     tag_keys=("tenant", "limit"))

    async def admit(self, tenant: str, reserve: int) -> Decision:
        return self.quotas.admit(tenant, reserve, time.time())

    async def record(self, records: list[UsageRecord], settles: list[tuple[int, int]], dropped: int = 0) -> None:
        now = time.time()
        for ticket, tokens in settles:
            self.quotas.settle(ticket, tokens, now)
        for r in records:
            if r.batch:  # Batch API lines take no reservation; their tokens count toward the day
                self.quotas.count(r.tenant, r.prompt_tokens + r.completion_tokens, now)
            tags = {"tenant": r.tenant if r.tenant in self.known else OTHER, "model": r.adapter or r.model or "-"}
            self.m_requests.inc(tags={**tags, "status": str(r.status)})
            for kind, n in (("prompt", r.prompt_tokens), ("cached", r.cached_tokens),
                            ("completion", r.completion_tokens)):
                if n:
                    self.m_tokens.inc(n, tags={**tags, "kind": kind})
            if self.access is not None:
                self.access.info(access_line(r))
        self.pending.extend(records)
        over = len(self.pending) - self.config.max_buffered
        for _ in range(max(over, 0)):
            self.pending.popleft()
        self._dropped(max(over, 0) + dropped)

    def _dropped(self, n: int) -> None:
        if n:
            self.dropped += n
            self.m_dropped.inc(n)
            logger.warning("usage: %d records dropped (buffer of %d full)", n, self.config.max_buffered)

    async def usage(self, query: Any) -> dict[str, Any]:
        """OpenAI's usage page for `query` (a store.UsageQuery), after writing what is buffered."""
        await self.flush()
        if self.store is None:
            raise errors.UnavailableError("the usage database cannot be reached; usage is buffered",
                                          code="usage_unavailable", retry_after=RECONNECT_S)
        return await asyncio.to_thread(self.store.usage, query)

    async def quota_status(self) -> dict[str, Any]:
        return {"quotas": self.quotas.snapshot(time.time()), "buffered": len(self.pending), "dropped": self.dropped}

    async def flush(self) -> None:
        while self.pending and self.store is not None:
            batch = [self.pending.popleft() for _ in range(min(WRITE_BATCH, len(self.pending)))]
            try:
                await asyncio.to_thread(self.store.write, batch)
            except Exception as exc:  # slow or down: keep them, try again next time
                self.pending.extendleft(reversed(batch))
                logger.warning("usage: %d records not written (%r); kept", len(self.pending), exc)
                return

    async def _write_loop(self) -> None:
        last_try = time.monotonic()
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            try:
                if self.store is None and time.monotonic() - last_try > RECONNECT_S:
                    last_try = time.monotonic()
                    await self._connect(required=False)
                await self.flush()
                self._sample()
            except Exception:  # the loop must outlive any failure
                logger.exception("usage write failed")

    def _sample(self) -> None:
        now = time.time()
        self.quotas.forget(now - 3600)
        for tenant, use in self.quotas.snapshot(now).items():
            for limit, used in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens"),
                                ("tokens_per_day", "tokens_today")):
                if use[limit]:
                    self.m_quota.set(use[used] / use[limit], tags={"tenant": tenant, "limit": limit})

    async def __del__(self) -> None:
        if hasattr(self, "_writer"):
            self._writer.cancel()
            await self.flush()
            if self.store is not None:
                self.store.close()


def _access_logger(config: ServeConfig) -> logging.Logger:
    path = access_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=config.access_log.max_bytes,
                                                   backupCount=config.access_log.backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("raylm.access")
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO)
    access.propagate = False
    return access


LedgerDeployment = serve.deployment(Ledger)
