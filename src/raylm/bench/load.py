"""A bounded streaming load generator: fixed concurrency, token counts from the server's `usage`."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class RequestResult:
    status: int
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    wall_s: float
    results: tuple[RequestResult, ...] = field(repr=False)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.status == 200]

    @property
    def output_tok_s(self) -> float:
        return sum(r.output_tokens for r in self.ok) / self.wall_s

    def ttft_p(self, q: float) -> float:
        ttfts = sorted(r.ttft_s for r in self.ok if r.ttft_s is not None)
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")

    @property
    def ttft_p50(self) -> float:
        return statistics.median(r.ttft_s for r in self.ok if r.ttft_s is not None)

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return RequestResult(resp.status_code)
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") or c.get("delta", {}).get("content")
                                    for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return RequestResult(200, ttft, time.perf_counter() - start, tokens)


async def run_load(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                   num_requests: int, timeout_s: float = 300.0) -> LoadResult:
    """Send `num_requests` streaming completions, `concurrency` at a time, with fixed output length."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    url = f"{base_url.rstrip('/')}/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                try:
                    results.append(await _one(client, url, body))
                except httpx.HTTPError:
                    results.append(RequestResult(0))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        wall = time.perf_counter() - start
    return LoadResult(concurrency, wall, tuple(results))
