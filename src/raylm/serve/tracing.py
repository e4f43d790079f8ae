"""OpenTelemetry traces of the serving path, exported over OTLP/HTTP (protobuf) to `<endpoint>/v1/traces`.

Off unless `serve.otlp_endpoint` is set: `Tracing(None, ...)` builds no SDK object, and each of its methods
returns at its first `if`. On, each process that serves requests (ingress, model replica, batch stage) owns one
`Tracing`, with a TracerProvider of its own: the global provider is left to vLLM and Ray, which may set theirs.

    client ──traceparent──▶ ingress  [server span] ──traceparent──▶ replica  [admission wait, prefill, decode]
                            answers `traceparent` of its server span (the client's trace, continued)

Within a process a parent is a `Span`; across processes it is the W3C `traceparent` string. A malformed
header starts a new trace rather than failing the request. The caller's sampled flag is honoured
(ParentBased(ALWAYS_ON), the SDK default, set here explicitly so no OTEL_TRACES_SAMPLER changes it): a
`traceparent` ending in `-00` records nothing in this process and echoes `-00`.

Span times are epoch nanoseconds. The serving code measures phases with `time.perf_counter()` and often
knows a span only after the fact (admission wait, prefill = submit→first token): `epoch_ns(t)` maps such a
reading onto the wall clock by anchoring at one `time.time_ns()` reading, taken when it is called.

Export never blocks a request: a span's end appends to the BatchSpanProcessor's bounded queue, and a worker
thread sends batches. With the collector down, a full queue drops its oldest spans (a warning, at most one
per 20 s); `flush` and `shutdown` wait at most their timeout, though the SDK's own ignore theirs.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue as AttrValue

__all__ = ["AttrValue", "Span", "Tracing", "epoch_ns", "now_ns", "valid_traceparent",
           "GEN_AI_OPERATION_NAME", "GEN_AI_REQUEST_MAX_TOKENS", "GEN_AI_REQUEST_MODEL", "GEN_AI_REQUEST_STREAM",
           "GEN_AI_RESPONSE_FINISH_REASONS", "GEN_AI_RESPONSE_ID", "GEN_AI_RESPONSE_MODEL",
           "GEN_AI_USAGE_INPUT_TOKENS", "GEN_AI_USAGE_OUTPUT_TOKENS"]

# OpenTelemetry GenAI semantic conventions (still "incubating" upstream, so named here; a test pins them).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # chat, text_completion, embeddings
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
# Seconds from the request at the edge to its first streamed byte (the name of the semantic conventions' metric).
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"

SCHEDULE_DELAY_MS = 250  # a finished span reaches the collector within about this (the SDK's default: 5 s)
EXPORT_TIMEOUT_S = 5.0  # one batch's POST, retries included; spent on the worker thread, never a request's
SHUTDOWN_TIMEOUT_S = 3.0  # at exit: a down collector must not hold a replica's stop for the SDK's 30 s

_PROPAGATOR = TraceContextTextMapPropagator()
_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}


def now_ns() -> int:
    """Now, as span times are: nanoseconds since the epoch."""
    return time.time_ns()


def epoch_ns(perf_counter_s: float) -> int:
    """A `time.perf_counter()` reading of this process (on Linux `time.monotonic()` reads the same clock)
    as epoch ns. Anchored at the wall clock now, per call, so a stepped wall clock moves only the spans
    converted after the step, as it moves `now_ns()` itself."""
    return time.time_ns() - round((time.perf_counter() - perf_counter_s) * 1e9)


def valid_traceparent(value: str | None) -> str | None:
    """`value` if it is a well-formed W3C traceparent of version 00 (lowercase hex ids, neither all zeros),
    as OTel's own propagator reads it; else None."""
    if not value or not value.startswith("00-"):  # the propagator also takes future versions and padding
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, _PROPAGATOR.extract({"traceparent": value}))
    return carrier.get("traceparent")


def _bounded(call: Callable[[], object], timeout_s: float) -> None:
    # The BatchSpanProcessor ignores force_flush's timeout and retries a down collector for up to the
    # exporter's timeout per batch, under a lock: a thread of its own is the only way to bound the wait.
    worker = threading.Thread(target=call, name="raylm-tracing-flush", daemon=True)
    worker.start()
    worker.join(timeout_s)


class Tracing:
    """One process's spans. `Tracing(None, ...)` is off: every method is a cheap no-op returning None / ""."""

    def __init__(self, endpoint: str | None, service_name: str, resource: Mapping[str, str] | None = None) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if not endpoint:
            return
        # The exporter pulls in requests and protobuf: paid only when tracing is on.
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT_S,
                                    compression=Compression.Gzip)
        self._provider = TracerProvider(resource=Resource({**(resource or {}), "service.name": service_name}),
                                        sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=SCHEDULE_DELAY_MS))
        self._tracer = self._provider.get_tracer("raylm")
        atexit.register(self.shutdown)  # the provider's own atexit hook would wait up to 30 s

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, name: str, parent: Span | str | None = None, *,
              kind: Literal["server", "client", "internal"] = "internal",
              attributes: Mapping[str, AttrValue] | None = None, start_ns: int | None = None) -> Span | None:
        """A live span, child of `parent`: a Span of this process, or a traceparent from another process
        (None, or a malformed one: a new trace). End it with `end`."""
        if self._tracer is None:
            return None
        return self._tracer.start_span(name, context=_context(parent), kind=_KINDS[kind], attributes=attributes,
                                       start_time=start_ns)

    def end(self, span: Span | None, end_ns: int | None = None, attributes: Mapping[str, AttrValue] | None = None,
            error: str | None = None) -> None:
        """End `span` (now, or at `end_ns`), adding `attributes`; `error` marks it failed, with that text."""
        if span is None:
            return
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def record(self, name: str, parent: Span | str | None, start_ns: int, end_ns: int,
               attributes: Mapping[str, AttrValue] | None = None) -> Span | None:
        """A span measured after the fact, finished in one call; returned so it can parent others."""
        span = self.start(name, parent, attributes=attributes, start_ns=start_ns)
        self.end(span, end_ns)
        return span

    def traceparent(self, span: Span | None) -> str | None:
        """The W3C header value that makes a span in another process (or the client) a child of `span`."""
        if span is None:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def trace_id(self, span: Span | None) -> str:
        """`span`'s trace id, 32 hex characters ("" when off), for logs and error bodies."""
        return "" if span is None else trace.format_trace_id(span.get_span_context().trace_id)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Send every finished span now; waits at most `timeout_s`. For tests and shutdown, never a request."""
        if self._provider is not None:
            _bounded(self._provider.force_flush, timeout_s)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send what is queued (waiting at most `timeout_s`) and stop; later calls are no-ops."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            atexit.unregister(self.shutdown)
            _bounded(provider.shutdown, timeout_s)


def _context(parent: Span | str | None) -> Context:
    # An explicit empty Context, not None: None would make the SDK take the ambient span of contextvars,
    # which vLLM's or Ray's own instrumentation may have set, and graft our trace onto theirs.
    if isinstance(parent, str):
        header = valid_traceparent(parent)
        return Context() if header is None else _PROPAGATOR.extract({"traceparent": header})
    return Context() if parent is None else trace.set_span_in_context(parent, Context())
