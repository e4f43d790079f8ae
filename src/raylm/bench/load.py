"""Bounded streaming load: one request measured, closed loops (fixed concurrency), open loops (Poisson).

Token counts come from the server's `usage`. Every loop is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass(frozen=True)
class RequestResult:
    """One request. `status` is the HTTP status (0: no answer); `error` is a mid-stream error event's code."""

    status: int
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    retry_after: str | None = None
    tag: str = ""
    started_s: float = 0.0
    itl_s: tuple[float, ...] = ()  # gaps between content chunks after the first (a stream's)
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def backoff_s(self) -> float:
        """How long the server asked this client to wait before its next request: a 429's or 503's Retry-After
        in seconds (an HTTP date or nothing: 0)."""
        try:
            return max(0.0, float(self.retry_after)) if self.status in (429, 503) and self.retry_after else 0.0
        except ValueError:
            return 0.0


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    wall_s: float
    results: tuple[RequestResult, ...] = field(repr=False)
    client_lag_p99_s: float | None = None  # the load generator's own event loop (LoopLag)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def output_tok_s(self) -> float:
        return sum(r.output_tokens for r in self.ok) / self.wall_s

    def ttft_p(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok if r.ttft_s is not None], q)

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.results)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), interpolated between the two nearest ranks (numpy's default); NaN for none."""
    return float(np.percentile(values, 100 * q)) if len(values) else float("nan")


def completion_body(model: str, prompt: str, max_tokens: int) -> dict:
    """A streaming completion of exactly `max_tokens` tokens (EOS ignored), with usage in the last chunk."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def send(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str] | None = None,
               tag: str = "") -> RequestResult:
    """POST one request; for a stream, time the first token and every chunk after it, and read to the end."""
    start = time.perf_counter()
    chunks: list[float] = []  # arrival of each chunk with text
    usage: dict = {}

    def result(status: int, error: str | None = None, retry_after: str | None = None) -> RequestResult:
        end = time.perf_counter()
        return RequestResult(status, chunks[0] - start if chunks else None, end - start,
                             usage.get("completion_tokens", 0), error, retry_after, tag, start,
                             tuple(b - a for a, b in itertools.pairwise(chunks)), usage.get("prompt_tokens", 0))

    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200 or not body.get("stream"):
                data = await resp.aread()
                if resp.status_code == 200:
                    usage = json.loads(data).get("usage") or {}
                return result(resp.status_code, retry_after=resp.headers.get("retry-after"))
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return result(200, error=str(chunk["error"].get("code")))
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    chunks.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as exc:
        return result(0, error=type(exc).__name__)
    return result(200)


Sender = Callable[[int], Awaitable[RequestResult]]


class LoopLag:
    """How late this event loop wakes a task (a 10 ms sleep's overshoot), sampled while the block runs. A client
    whose loop lags counts its own queue in every latency it measures: at c=64 on 2 cores shared with the server,
    two thirds of a first token's time was spent in the client before its request reached the server
    (BENCHMARKS.md §2, "Where a first token's time goes")."""

    INTERVAL_S = 0.01

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.INTERVAL_S)
            self.lags.append(max(0.0, time.perf_counter() - before - self.INTERVAL_S))

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @property
    def p99_s(self) -> float | None:
        return percentile(self.lags, 0.99) if self.lags else None


async def closed_loop(sender: Sender, concurrency: int, num_requests: int, timeout_s: float,
                      backoff: bool = False) -> LoadResult:
    """`concurrency` workers send `num_requests` requests back to back (bounded by `timeout_s`). `backoff`: a
    worker refused with a Retry-After waits it first, as OpenAI's SDKs do (`raylm bench`); without, it resends
    at once, a flood (the tests' attacks). SmolLM2 at c=64 on 2 cores, resent at once: 6,385 refusals in 60 s,
    the service's CPU spent on them."""
    results: list[RequestResult] = []
    counter = iter(range(num_requests))
    deadline = time.perf_counter() + timeout_s

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            results.append(result := await sender(i))
            if backoff and result.backoff_s:
                await asyncio.sleep(min(result.backoff_s, max(0.0, deadline - time.perf_counter())))

    start = time.perf_counter()
    async with LoopLag() as lag:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s + 60)
    return LoadResult(concurrency, time.perf_counter() - start, tuple(results), lag.p99_s)


async def open_loop(sender: Sender, rate: float, duration_s: float, seed: int = 0,
                    drain_s: float = 120.0, max_requests: int | None = None) -> LoadResult:
    """Poisson arrivals at `rate` per second for `duration_s` (or `max_requests`), whatever the answers;
    then wait for them."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[RequestResult]] = []
    start = time.perf_counter()
    next_at = start
    i = 0
    async with LoopLag() as lag:
        while next_at < start + duration_s and (max_requests is None or i < max_requests):
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(sender(i)))
            i += 1
            next_at += rng.expovariate(rate)
        done = await asyncio.wait_for(asyncio.gather(*tasks), drain_s)
    return LoadResult(0, time.perf_counter() - start, tuple(done), lag.p99_s)


async def run_load(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                   num_requests: int, timeout_s: float = 300.0) -> LoadResult:
    """Send `num_requests` streaming completions, `concurrency` at a time, with fixed output length."""
    url = f"{base_url.rstrip('/')}/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def sender(i: int) -> RequestResult:
            return await send(client, url, completion_body(model, prompts[i % len(prompts)], max_tokens))

        return await closed_loop(sender, concurrency, num_requests, timeout_s)
