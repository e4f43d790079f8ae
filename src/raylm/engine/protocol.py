"""The engine seam: what a model replica needs from an inference engine.

Engines speak OpenAI shapes as plain data: a finished response is a dict, a stream is an async iterator
of chunk payloads (each one JSON text of one OpenAI chunk object). SSE framing belongs to the HTTP layer.
Engines raise `raylm.errors` exceptions for bad requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

Endpoint = Literal["chat", "completions", "embeddings"]
Result = dict | AsyncIterator[str]


class Engine(Protocol):
    endpoints: frozenset[Endpoint]

    async def start(self) -> None: ...

    async def create(self, endpoint: Endpoint, body: dict, request_id: str) -> Result: ...

    def prompt_tokens(self, endpoint: Endpoint, body: dict) -> int:
        """Prompt tokens of a request (an estimate is fine: it bounds the queue, not the model)."""

    def num_running(self) -> int:
        """Requests inside the engine now; drops when a request finishes or is aborted."""

    async def health(self) -> None:
        """Raise if the engine cannot serve."""

    async def shutdown(self) -> None: ...
