"""The service's Prometheus metrics, through Ray's metrics export (one endpoint per node, every process).

    raylm_requests_total{model, endpoint, status}         every answer by HTTP status (a cut stream: 500)
    raylm_rejections_total{model, reason}                  429/503 by reason: queue_full, queue_tokens_full,
                                                           queue_wait (admission), no_replica (a cold start
                                                           too long), service_unavailable
    raylm_time_to_first_token_seconds{model, endpoint}     at the ingress: queueing and hops included
    raylm_inter_token_latency_seconds{model, endpoint}     at the ingress: a stream's mean gap between chunks
    raylm_request_latency_seconds{model, endpoint}         at the ingress, to the last byte
    raylm_stream_resumes_total{model, outcome}             streams cut mid-way by their replica's end (serve/resume.py):
                                                           resumed on another replica, or failed (an error event)
    raylm_requests_running{model, replica}                 sequences in the engine, by admission (a request
                                                           with n > 1 counts n)
    raylm_requests_queued{model, replica}                  waiting in the replica's fair queue
    raylm_queued_prompt_tokens{model, replica}
    raylm_adapter_loads_total{model, adapter}             a LoRA adapter's request on a replica that did not hold
                                                           it (among its max_cpu_loras most recently used)

The engine's own (vLLM's Prometheus stat logger on Ray metrics, as Ray Serve LLM uses it), with a
`model_name` label: vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
vllm:e2e_request_latency_seconds, vllm:num_requests_running/waiting, vllm:prompt_tokens_total,
vllm:generation_tokens_total, ... On export Ray prefixes every name with `ray_` and vLLM's `:` becomes `_`:
raylm_requests_total is scraped as ray_raylm_requests_total, vllm:generation_tokens_total as
ray_vllm_generation_tokens_total.
"""

from __future__ import annotations

import time

from ray.util import metrics

from raylm.serve.status import Window

# Seconds; from a few ms (a loaded tiny model's token) to minutes (a cold start behind a queue).
LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8,
                   13, 20, 30, 60, 120]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5]


class IngressMetrics:
    """Made in the ingress replica (Ray metrics belong to the process that records them)."""

    def __init__(self) -> None:
        self.window = Window()  # the last minute, for /status
        keys = ("model", "endpoint")
        self.requests = metrics.Counter("raylm_requests_total", "Answers by HTTP status.",
                                        tag_keys=("model", "endpoint", "status"))
        self.rejections = metrics.Counter("raylm_rejections_total", "Requests refused with 429/503, by reason.",
                                          tag_keys=("model", "reason"))
        self.ttft = metrics.Histogram("raylm_time_to_first_token_seconds", "Request in to first chunk out, at the ingress.",
                                      boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.itl = metrics.Histogram("raylm_inter_token_latency_seconds", "A stream's mean gap between chunks.",
                                     boundaries=TOKEN_BUCKETS, tag_keys=keys)
        self.resumes = metrics.Counter("raylm_stream_resumes_total", "Streams cut by their replica's end, by whether "
                                       "they went on on another replica.", tag_keys=("model", "outcome"))
        self.latency = metrics.Histogram("raylm_request_latency_seconds", "Request in to last byte out, at the ingress.",
                                         boundaries=LATENCY_BUCKETS, tag_keys=keys)

    def answered(self, model: str, endpoint: str, status: int, start: float, reason: str | None = None,
                 tenant: str = "-") -> None:
        tags = {"model": model, "endpoint": endpoint}
        self.requests.inc(tags={**tags, "status": str(status)})
        if status in (429, 503):
            self.rejections.inc(tags={"model": model, "reason": reason or "unknown"})
        elif status == 200:
            self.latency.observe(time.perf_counter() - start, tags=tags)
            self.window.answered(model, tenant)

    def resumed(self, model: str, ok: bool) -> None:
        self.resumes.inc(tags={"model": model, "outcome": "resumed" if ok else "failed"})

    def stream(self, model: str, endpoint: str, start: float, tenant: str = "-") -> StreamTimer:
        return StreamTimer(self, {"model": model, "endpoint": endpoint}, start, tenant)


class StreamTimer:
    """Times one stream at the ingress: its first chunk, its mean gap between chunks (one observation per
    stream, not per token: Ray's agent replays every observation) and its end."""

    __slots__ = ("metrics", "tags", "start", "tenant", "first", "last", "chunks")

    def __init__(self, metrics: IngressMetrics, tags: dict[str, str], start: float, tenant: str = "-") -> None:
        self.metrics, self.tags, self.start, self.tenant = metrics, tags, start, tenant
        self.first = self.last = 0.0
        self.chunks = 0

    def chunk(self) -> None:
        self.last = time.perf_counter()
        if not self.chunks:
            self.first = self.last
            self.metrics.ttft.observe(self.first - self.start, tags=self.tags)
            self.metrics.window.ttft(self.tags["model"], self.first - self.start, self.tenant)
        self.chunks += 1

    def end(self, status: int) -> None:
        """status: 200, 500 (cut short), 499 (the client went away, nginx's code for it)."""
        if self.chunks > 1:
            self.metrics.itl.observe((self.last - self.first) / (self.chunks - 1), tags=self.tags)
        self.metrics.answered(self.tags["model"], self.tags["endpoint"], status, self.start, tenant=self.tenant)


class ReplicaMetrics:
    """Admission's state on one model replica, sampled every second."""

    def __init__(self, model: str, replica: str) -> None:
        self.tags = {"model": model, "replica": replica}
        keys = tuple(self.tags)
        self.running = metrics.Gauge("raylm_requests_running", "Sequences in the engine (n > 1 counts n).",
                                     tag_keys=keys)
        self.queued = metrics.Gauge("raylm_requests_queued", "Requests in the replica's fair queue.",
                                    tag_keys=keys)
        self.queued_tokens = metrics.Gauge("raylm_queued_prompt_tokens", "Prompt tokens in the fair queue.",
                                           tag_keys=keys)

        self.adapter_loads = metrics.Counter("raylm_adapter_loads_total", "Adapter loads on a replica (not held).",
                                             tag_keys=("model", "adapter"))

    def adapter_loaded(self, adapter: str) -> None:
        self.adapter_loads.inc(tags={"model": self.tags["model"], "adapter": adapter})

    def sample(self, running: int, queued: int, queued_tokens: int) -> None:
        self.running.set(running, tags=self.tags)
        self.queued.set(queued, tags=self.tags)
        self.queued_tokens.set(queued_tokens, tags=self.tags)
