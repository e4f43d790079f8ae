"""One request's spans at the ingress, when tracing is on (serve.otlp_endpoint): phases that follow each other
under the request's server span, so their times add up to it.

    POST /v1/chat/completions  [server]            the client's traceparent continued; echoed in the answer
     ├─ auth                                        key → tenant
     ├─ read body                                   the JSON body and the model it names
     ├─ quota                                       the Ledger's answer (tenants with quotas)
     ├─ forward  [client]                           the handle call, to the first reply (a whole answer: all of it)
     │   ├─ route                                   until Serve's router has picked a replica
     │   └─ replica  [server, the model replica]    prepare · admission wait · prefill · decode  (replica/server.py)
     └─ relay                                       a stream's bytes to the client, first to last

A stream's server span carries its time to first token at the edge (gen_ai.server.time_to_first_token, seconds).
"""

from __future__ import annotations

import time
from typing import Any

from raylm.contract import Usage
from raylm.serve.tracing import (GEN_AI_OPERATION_NAME, GEN_AI_REQUEST_MODEL, GEN_AI_REQUEST_STREAM,
                                 GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, GEN_AI_USAGE_INPUT_TOKENS,
                                 GEN_AI_USAGE_OUTPUT_TOKENS, Tracing, epoch_ns, valid_traceparent)

# OpenTelemetry's GenAI operation names, by endpoint.
OPERATIONS = {"chat": "chat", "completions": "text_completion", "responses": "chat", "messages": "chat",
              "embeddings": "embeddings"}


class RequestSpans:
    def __init__(self, tracing: Tracing, traceparent: str | None, method_path: str, endpoint: str,
                 start: float) -> None:
        """`start`: the request's time.perf_counter() reading when it came in."""
        self.tracing = tracing
        self.root = tracing.start(method_path, valid_traceparent(traceparent), kind="server", start_ns=epoch_ns(start),
                                  attributes={"http.route": method_path.partition(" ")[2], "raylm.endpoint": endpoint,
                                              GEN_AI_OPERATION_NAME: OPERATIONS.get(endpoint, endpoint)})
        self.last = start  # where the next phase begins
        self.forward_span: Any = None
        self.sent = 0.0

    @property
    def traceparent(self) -> str | None:
        return self.tracing.traceparent(self.root)

    @property
    def trace_id(self) -> str:
        return self.tracing.trace_id(self.root)

    def phase(self, name: str, **attributes: Any) -> None:
        """The phase `name` ended now."""
        now = time.perf_counter()
        self.tracing.record(name, self.root, epoch_ns(self.last), epoch_ns(now), attributes or None)
        self.last = now

    def forward(self, model: str) -> str | None:
        """A handle call starts now; the traceparent its replica continues."""
        self.sent = time.perf_counter()
        self.forward_span = self.tracing.start("forward", self.root, kind="client", start_ns=epoch_ns(self.last),
                                               attributes={GEN_AI_REQUEST_MODEL: model})
        return self.tracing.traceparent(self.forward_span)

    def routed(self) -> None:
        self.tracing.record("route", self.forward_span, epoch_ns(self.sent), epoch_ns(time.perf_counter()))

    def forwarded(self, error: str | None = None) -> None:
        """The handle call's first reply came (or it failed): once per `forward`."""
        if self.forward_span is None:
            return
        now = time.perf_counter()
        self.tracing.end(self.forward_span, epoch_ns(now), error=error)
        self.forward_span, self.last = None, now

    def end(self, status: int, usage: Usage | None, stream: bool, code: str | None, end: float, tenant: str,
            ttft_s: float | None = None) -> None:
        """`ttft_s`: a stream's first byte relayed, in seconds from the request's start here."""
        if stream:
            self.tracing.record("relay", self.root, epoch_ns(self.last), epoch_ns(end))
        attributes: dict[str, Any] = {"http.response.status_code": status, GEN_AI_REQUEST_STREAM: stream,
                                      "raylm.tenant": tenant}
        if ttft_s is not None:
            attributes[GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] = ttft_s
        if usage is not None:
            attributes.update({GEN_AI_USAGE_INPUT_TOKENS: usage.prompt_tokens,
                               GEN_AI_USAGE_OUTPUT_TOKENS: usage.completion_tokens, "raylm.replica": usage.replica})
        self.tracing.end(self.root, epoch_ns(end), attributes, error=code if status >= 500 else None)
