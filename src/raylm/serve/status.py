"""The service at a glance (`GET /status`, `raylm status`): per model its replicas and their state, requests
running and queued, tokens/s and TTFT p50/p99 over the last minute, and the tenants' shares.

    model replica ── every second: running, queued, tokens/s ──► Ray's KV store (GCS), one key per replica
    ingress       ── TTFT and answers per tenant, last 60 s (its own Window) ─┐
    GET /status   ◄── Serve's replica states + the replicas' keys + the Window ┘

Prometheus (`/metrics`) keeps the history; this is the now, readable without a dashboard.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from raylm import _ray

WINDOW_S = 60.0
_KEY_PREFIX = "raylm-status/"
_STALE_S = 5.0  # a replica that has not reported for this long is gone (or stuck) and is not counted


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Window:
    """What the ingress saw over the last minute: first-token times and answers by tenant, per model."""

    def __init__(self, span_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.span_s, self.clock = span_s, clock
        self._ttft: deque[tuple[float, str, float, str]] = deque()
        self._answers: deque[tuple[float, str, str]] = deque()

    def ttft(self, model: str, seconds: float, tenant: str = "-") -> None:
        now = self.clock()
        self._ttft.append((now, model, seconds, tenant))
        self._trim(self._ttft, now)

    def answered(self, model: str, tenant: str) -> None:
        now = self.clock()
        self._answers.append((now, model, tenant))
        self._trim(self._answers, now)

    def kept(self) -> int:
        """Events held: what this window costs in memory (the last minute's, however long it has run)."""
        return len(self._ttft) + len(self._answers)

    def _trim(self, events: deque, now: float) -> None:
        """Forget what left the window: kept at each event, so memory follows the last minute's traffic."""
        while events and events[0][0] < now - self.span_s:
            events.popleft()

    def summary(self, tenant: str | None = None) -> dict[str, dict[str, Any]]:
        """Per model: TTFT p50/p99, answers and tenants' shares; for one `tenant`, its own figures only."""
        now = self.clock()
        for events in (self._ttft, self._answers):
            self._trim(events, now)
        out: dict[str, dict[str, Any]] = {}
        for model in {e[1] for e in self._ttft} | {e[1] for e in self._answers}:
            ttfts = [s for _, m, s, t in self._ttft if m == model and tenant in (None, t)]
            tenants = [t for _, m, t in self._answers if m == model]
            shares = {t: round(tenants.count(t) / len(tenants), 3) for t in sorted(set(tenants)) if tenant in (None, t)}
            out[model] = {"ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
                          "answered": sum(tenant in (None, t) for t in tenants), "tenant_shares": shares}
        return out


class TokenRate:
    """Tokens/s over the last minute from a running total, sampled once a second."""

    def __init__(self, span_s: float = WINDOW_S) -> None:
        self.samples: deque[tuple[float, int]] = deque()
        self.span_s = span_s

    def sample(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while self.samples[0][0] < now - self.span_s:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def publish(model: str, replica: str, report: dict[str, Any]) -> None:
    """A replica's report (blocking: call it off the event loop)."""
    _ray.kv_put(f"{_KEY_PREFIX}{model}/{replica}", json.dumps({**report, "time": time.time()}))


def withdraw(model: str, replica: str) -> None:
    _ray.kv_del(f"{_KEY_PREFIX}{model}/{replica}")


def reports(max_age_s: float | None = _STALE_S) -> dict[str, list[dict[str, Any]]]:
    """Every replica's last report, by model (blocking)."""
    now, out = time.time(), {}
    for key in _ray.kv_list(_KEY_PREFIX):
        raw = _ray.kv_get(key)
        report = json.loads(raw) if raw else None
        if report and (max_age_s is None or now - report["time"] <= max_age_s):
            model, _, replica = key.decode()[len(_KEY_PREFIX):].rpartition("/")
            out.setdefault(model, []).append({"replica": replica, **report})
    return out


def replica_counts(deployment: Any) -> dict[str, int]:
    """A Serve deployment's replicas by state (`RUNNING`, `STARTING`, ...); {} for none."""
    return dict(deployment.replica_states) if deployment else {}


def _replica_states(app_name: str, deployments: dict[str, str]) -> dict[str, dict[str, Any]]:
    app = _ray.serve_app(app_name)
    out = {}
    for model, deployment in deployments.items():
        d = app.deployments.get(deployment) if app is not None else None
        out[model] = {"status": d.status if d else "UNKNOWN",
                      "replicas": replica_counts(d),
                      "message": d.message if d else ""}
    return out


async def collect(app_name: str, deployments: dict[str, str], window: Window,
                  tenant: str | None = None, adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """The /status body: {"models": {name: {...}}}, gathered off the event loop. For a `tenant` (not an
    admin): its own TTFT, answers and share, the models' load, and no replica's PID or Serve's messages.
    `adapters`: each LoRA adapter's base model; an adapter's figures are under its base's `adapters`."""
    states, by_model = await asyncio.gather(asyncio.to_thread(_replica_states, app_name, deployments),
                                            asyncio.to_thread(reports))
    seen = window.summary(tenant)
    models = {}
    for model in deployments:
        mine = sorted(by_model.get(model, []), key=lambda r: r["replica"])
        models[model] = {**states[model],
                         "running": sum(r["running"] for r in mine), "queued": sum(r["queued"] for r in mine),
                         "tokens_per_s": round(sum(r["tokens_per_s"] for r in mine), 1),
                         **seen.get(model, {"ttft_p50_s": None, "ttft_p99_s": None, "answered": 0,
                                            "tenant_shares": {}}),
                         "replica_reports": mine,
                         "adapters": {name: {
                             **seen.get(name, {"ttft_p50_s": None, "ttft_p99_s": None, "answered": 0}),
                             "held_by": sum(name in r.get("adapters", ()) for r in mine)}
                             for name, base in sorted((adapters or {}).items()) if base == model},
                         "adapter_loads": sum(r.get("adapter_loads", 0) for r in mine)}
        if tenant is not None:
            models[model].update(message="", replica_reports=[])
    return {"window_s": window.span_s, "models": models, **({"tenant": tenant} if tenant is not None else {})}


def render(status: dict[str, Any]) -> Iterable[Any]:
    """The body as rich tables, for `raylm status`."""
    from rich.table import Table

    table = Table(title=f"raylm — last {status['window_s']:.0f} s")
    for column in ("model", "state", "replicas", "running", "queued", "tok/s", "TTFT p50", "TTFT p99",
                   "answered", "tenants"):
        table.add_column(column, justify="left" if column in ("model", "state", "replicas", "tenants") else "right")
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    for name, m in status["models"].items():
        table.add_row(name, m["status"], ", ".join(f"{n} {k.lower()}" for k, n in m["replicas"].items()) or "-",
                      str(m["running"]), str(m["queued"]), f"{m['tokens_per_s']:.1f}", ms(m["ttft_p50_s"]),
                      ms(m["ttft_p99_s"]), str(m["answered"]),
                      ", ".join(f"{t} {s:.0%}" for t, s in m["tenant_shares"].items()) or "-")
        for adapter, a in m.get("adapters", {}).items():
            table.add_row(f"  {adapter}", "adapter", f"held by {a['held_by']}", "", "", "", ms(a["ttft_p50_s"]),
                          ms(a["ttft_p99_s"]), str(a["answered"]), "")
    yield table
    if status.get("quotas"):
        yield quota_table(status["quotas"])
    for name, m in status["models"].items():
        if m.get("adapter_loads"):
            yield f"{name}: {m['adapter_loads']} adapter loads since its replicas started"
        if m["message"]:
            yield f"{name}: {m['message']}"


def quota_table(quotas: dict[str, dict[str, Any]]) -> Any:
    """Each limited tenant's use of its quotas: used / limit (share)."""
    from rich.table import Table

    table = Table(title="quotas")
    for column in ("tenant", "requests (60 s)", "tokens (60 s)", "tokens today (UTC)"):
        table.add_column(column, justify="left" if column == "tenant" else "right")

    def use(used: int, limit: int | None) -> str:
        return "-" if limit is None else f"{used:,} / {limit:,} ({used / limit:.0%})"

    for tenant, q in sorted(quotas.items()):
        table.add_row(tenant, use(q["requests"], q["requests_per_minute"]), use(q["tokens"], q["tokens_per_minute"]),
                      use(q["tokens_today"], q["tokens_per_day"]))
    return table
