"""A real OTLP/HTTP trace receiver for tests: `POST /v1/traces` (protobuf, gzip or not) on 127.0.0.1, in a
background thread, keeping what it decodes as plain `Span` values.

    with OTLPReceiver() as receiver:
        tracing = Tracing(receiver.endpoint, "ingress")
        ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3, timeout_s=5)
        print(tree(spans))
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

_STATUS = {0: "unset", 1: "ok", 2: "error"}


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # 16 hex, or "" for a trace's root
    name: str
    kind: str  # server, client, internal, producer, consumer, unspecified
    start_ns: int
    end_ns: int
    attributes: Mapping[str, object]
    status: str  # unset, ok, error
    status_message: str
    service_name: str

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(value: AnyValue) -> object:
    field = value.WhichOneof("value")
    if field == "array_value":
        return [_value(v) for v in value.array_value.values]
    if field == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if field is None else getattr(value, field)


def _attributes(pairs: list[KeyValue]) -> dict[str, object]:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode(request: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                kind = trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_").lower()
                spans.append(Span(trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                                  parent_span_id=s.parent_span_id.hex(), name=s.name, kind=kind,
                                  start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                                  attributes=_attributes(s.attributes), status=_STATUS[s.status.code],
                                  status_message=s.status.message, service_name=service))
    return spans


class OTLPReceiver:
    """Serves until `close` (or the end of a `with` block); `endpoint` is the base URL an exporter is given."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._changed = threading.Condition()
        self.requests = 0  # export calls answered, gzip or not
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[Span]:
        return sorted((s for s in self.spans() if s.trace_id == trace_id), key=lambda s: s.start_ns)

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout_s: float) -> list[Span]:
        """Every span so far, once `predicate` holds of them; AssertionError with what came if not in time."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"spans after {timeout_s} s:\n{tree(self._spans) or '(none)'}")
                self._changed.wait(left)
            return list(self._spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> OTLPReceiver:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _received(self, spans: list[Span]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.requests += 1
            self._changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/v1/traces":
                    self._answer(404, b"")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "").lower()
                try:
                    body = gzip.decompress(body) if encoding == "gzip" else \
                        zlib.decompress(body) if encoding == "deflate" else body
                    spans = decode(ExportTraceServiceRequest.FromString(body))
                except Exception as error:  # a malformed export is the exporter's bug: say so in its 400
                    self._answer(400, str(error).encode())
                    return
                receiver._received(spans)
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output for the tests
                pass

        return Handler


def tree(spans: list[Span]) -> str:
    """Spans as indented trees, one line each: start offset from the earliest span and duration, in ms."""
    if not spans:
        return ""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for s in spans:
        # A parent from another process that did not export here (a client) makes its child a root.
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
    origin = min(s.start_ns for s in spans)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s.start_ns, s.name)):
            error = f"  ERROR {s.status_message}" if s.status == "error" else ""
            lines.append(f"{'  ' * depth}{s.name} [{s.service_name}]  +{(s.start_ns - origin) / 1e6:.1f} ms  "
                         f"{s.duration_ms:.1f} ms{error}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
