"""One request's spans in its model replica (tracing on), children of the ingress's `forward` span:

    replica  [server]          from the handle call to the request's end (a stream's last token)
     ├─ prepare                checked, parsed and counted (engine.prepare)
     ├─ admission wait         in the fair queue, until a slot (admission.py)
     ├─ prefill                the engine started it → its first token
     ├─ decode                 first token → last token
     └─ llm_request            vLLM's own span (engine attributes: its queue, prefill and decode times)
"""

from __future__ import annotations

from typing import Any

from raylm.contract import Call
from raylm.engine.protocol import Meter
from raylm.serve.tracing import (GEN_AI_REQUEST_MODEL, GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_OUTPUT_TOKENS, Tracing,
                                 now_ns)


class ReplicaSpans:
    def __init__(self, tracing: Tracing, call: Call, replica: str) -> None:
        self.tracing = tracing
        self.last = now_ns()
        self.root = tracing.start("replica", call.trace, kind="server", start_ns=self.last,
                                  attributes={GEN_AI_REQUEST_MODEL: call.body.get("model", ""),
                                              "raylm.replica": replica, "raylm.endpoint": call.endpoint,
                                              "raylm.batch": call.tenant.batch})

    @property
    def traceparent(self) -> str | None:
        return self.tracing.traceparent(self.root)

    def phase(self, name: str, **attributes: Any) -> None:
        now = now_ns()
        self.tracing.record(name, self.root, self.last, now, attributes or None)
        self.last = now

    def end(self, meter: Meter, status: int, code: str | None = None) -> None:
        end = now_ns()
        if meter.first_token_ns:
            self.tracing.record("prefill", self.root, self.last, meter.first_token_ns)
            last = max(meter.last_token_ns, meter.first_token_ns)
            self.tracing.record("decode", self.root, meter.first_token_ns, last)
        elif status < 400:  # no tokens made (embeddings, scores): the engine's whole time
            self.tracing.record("engine", self.root, self.last, end)
        self.tracing.end(self.root, end, {GEN_AI_USAGE_INPUT_TOKENS: meter.prompt_tokens,
                                          GEN_AI_USAGE_OUTPUT_TOKENS: meter.completion_tokens,
                                          "http.response.status_code": status},
                         error=code if status >= 500 else None)
