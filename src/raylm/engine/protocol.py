"""The engine seam: what a model replica needs from an inference engine.

Engines speak the API's shapes as plain data: a finished response is its JSON body (bytes), a stream is an
async iterator of chunk payloads (each one JSON text of one chunk or event object; an event's name is its
`type`, as in the Responses and Anthropic Messages APIs). SSE framing belongs to the HTTP layer.
Engines raise `raylm.errors` exceptions for bad requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Endpoint = Literal["chat", "completions", "responses", "messages", "count_tokens", "embeddings", "score", "rerank",
                   "tokenize", "detokenize"]
Result = bytes | AsyncIterator[str]

# Each endpoint's paths, as vLLM's server routes them (score and rerank under several names).
PATHS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("/v1/chat/completions",), "completions": ("/v1/completions",), "responses": ("/v1/responses",),
    "messages": ("/v1/messages",), "count_tokens": ("/v1/messages/count_tokens",),
    "embeddings": ("/v1/embeddings",), "score": ("/score", "/v1/score"),
    "rerank": ("/rerank", "/v1/rerank", "/v2/rerank"), "tokenize": ("/tokenize",), "detokenize": ("/detokenize",)}
# What a model of each task may serve; an engine serves those of them its model supports.
TASK_ENDPOINTS: dict[str, frozenset[Endpoint]] = {
    "generate": frozenset({"chat", "completions", "responses", "messages", "count_tokens", "tokenize",
                           "detokenize"}),
    "embed": frozenset({"embeddings", "score", "rerank", "tokenize", "detokenize"})}
# Streams whose chunks are named events (SSE `event:` lines, no `[DONE]`), the name being the chunk's `type`.
NAMED_EVENTS: frozenset[Endpoint] = frozenset({"responses", "messages"})


@dataclass(frozen=True)
class PromptSize:
    total: int  # every prompt of the request (a batch of completions or embeddings has several)
    longest: int  # the longest one, which must fit the context


@dataclass(frozen=True)
class Prepared:
    """A request the engine has checked, parsed and counted: it can only fail now for want of capacity."""
    endpoint: Endpoint
    request: Any  # the engine's own parsed request
    size: PromptSize


class Engine(Protocol):
    endpoints: frozenset[Endpoint]
    generated_tokens: int  # since start, every request's

    async def start(self) -> None: ...

    async def prepare(self, endpoint: Endpoint, body: dict) -> Prepared:
        """Check, parse and count a request off the event loop, before admission; raise for a bad one
        (`raylm.errors`), a prompt longer than the context included. Its prompt tokens may be an estimate:
        they bound the queue."""

    async def create(self, prepared: Prepared, request_id: str) -> Result: ...

    def num_running(self) -> int:
        """Requests inside the engine now; drops when a request finishes or is aborted."""

    async def health(self) -> None:
        """Raise if the engine cannot serve."""

    def stalled_s(self) -> float:
        """Seconds the engine has held requests without finishing a step; 0 when it holds none."""

    async def shutdown(self) -> None: ...
