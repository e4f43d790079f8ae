"""`raylm bench`: the same streaming load at each point of a concurrency sweep and of a Poisson rate list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx

from raylm.bench.load import LoadResult, RequestResult, closed_loop, completion_body, open_loop, send
from raylm.bench.report import Point, point_label, summarize


@dataclass
class BenchSpec:
    url: str  # the OpenAI base URL, ending in /v1
    model: str
    prompts: list[str]
    output_tokens: int = 64
    endpoint: Literal["completions", "chat"] = "completions"
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    requests: int = 64  # per load point
    duration_s: float = 120.0  # per load point, at most
    warmup: int = 4  # requests before the first point, not measured
    slo: dict[str, float] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 300.0  # per request
    seed: int = 0

    def body(self, i: int) -> dict:
        body = completion_body(self.model, self.prompts[i % len(self.prompts)], self.output_tokens)
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        return body

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def points(self) -> list[tuple[str, float]]:
        return [("concurrency", c) for c in self.concurrency] + [("rate", r) for r in self.rates]


async def run_bench(spec: BenchSpec, on_request: Callable[[str, RequestResult], None] = lambda label, r: None,
                    ) -> list[tuple[Point, LoadResult]]:
    """Warm up, then each load point in turn; `on_request(point label, result)` after every request."""
    url = f"{spec.url.rstrip('/')}/{'chat/completions' if spec.endpoint == 'chat' else 'completions'}"
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=max([*spec.concurrency, 64]))
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout_s, connect=10), limits=limits,
                                 headers=spec.headers) as client:
        offset = 0  # every request of the run gets the next prompt: no two share a prefix-cache hit by design

        def sender(label: str) -> Callable[[int], object]:
            async def one(i: int) -> RequestResult:
                result = await send(client, url, spec.body(offset + i))
                on_request(label, result)
                return result
            return one

        if spec.warmup:
            await closed_loop(sender("warmup"), min(spec.warmup, max([*spec.concurrency, 1])), spec.warmup,
                              spec.duration_s)
            offset += spec.warmup
        for load, value in spec.points:
            label = point_label(load, value)
            if load == "concurrency":
                result = await closed_loop(sender(label), int(value), spec.requests, spec.duration_s,
                                           backoff=True)
            else:
                result = await open_loop(sender(label), value, spec.duration_s, seed=spec.seed,
                                         drain_s=spec.timeout_s, max_requests=spec.requests)
            offset += len(result.results)
            out.append((summarize(result, load, value, spec.slo), result))
    return out


def check_server(spec: BenchSpec) -> None:
    """Fail early, with the server's words, when the URL or the model is wrong."""
    try:
        resp = httpx.get(f"{spec.url.rstrip('/')}/models", headers=spec.headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {spec.url}: {exc}") from None
    if resp.status_code != 200:
        raise ValueError(f"GET {spec.url}/models answered {resp.status_code}: {resp.text[:300]}")
    models = [m.get("id") for m in resp.json().get("data", [])]
    if spec.model not in models:
        raise ValueError(f"{spec.url} does not serve {spec.model!r}; it serves {', '.join(map(str, models))}")

