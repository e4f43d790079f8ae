"""The engine seam: what a model replica needs from an inference engine.

Engines speak the API's shapes as plain data: a finished response is its JSON body (bytes), a stream is an
async iterator of chunk payloads (each one JSON text of one chunk or event object; an event's name is its
`type`, as in the Responses and Anthropic Messages APIs). SSE framing belongs to `raylm.contract`.
Engines raise `raylm.errors` exceptions for bad requests.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from raylm.contract import Adapter, Endpoint, Usage

Result = bytes | AsyncIterator[str]


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
    sequences: int = 1  # side by side in the engine: `n` (or `best_of`), as the engine parsed it
    fetches: bool = False  # the engine will fetch a remote media URL for it (an allowed domain's)


class Meter:
    """One request's tokens as its engine makes them, counted as they come (a stream its client cuts off
    keeps what was made before the abort): the engine writes, the replica reads when the request ends."""

    __slots__ = ("prompt_tokens", "cached_tokens", "completion_tokens", "first_token_ns", "last_token_ns", "ids",
                 "prompt_ids")

    def __init__(self, keep_ids: bool = False) -> None:
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.first_token_ns = self.last_token_ns = 0  # when the engine handed over the first, last token (epoch ns)
        # keep_ids (a resumable stream, serve/resume.py): the prompt's and the first choice's token ids
        self.ids: list[int] | None = [] if keep_ids else None
        self.prompt_ids: list[int] = []

    def generated(self, tokens: int) -> None:
        if tokens:
            self.last_token_ns = time.time_ns()
            self.first_token_ns = self.first_token_ns or self.last_token_ns
            self.completion_tokens += tokens

    def usage(self, replica: str = "") -> Usage:
        return Usage(self.prompt_tokens, self.cached_tokens, self.completion_tokens, replica)


class Engine(Protocol):
    endpoints: frozenset[Endpoint]
    generated_tokens: int  # since start, every request's

    async def start(self) -> None: ...

    async def prepare(self, endpoint: Endpoint, body: dict, on_loop: bool = False) -> Prepared:
        """Check, parse and count a request before admission, off the event loop; raise for a bad one
        (`raylm.errors`), a prompt longer than the context included. Its prompt tokens may be an estimate:
        they bound the queue. `on_loop`: the body is small (`counting.within(body, counting.SMALL_BODY)`),
        prepare it on the caller's loop, at once."""

    async def create(self, prepared: Prepared, request_id: str, meter: Meter | None = None,
                     trace: str | None = None) -> Result:
        """Run a prepared request; its tokens go to `meter` as the engine makes them (prompt, cached,
        completion: what the answer's `usage` says), a stream's too, until it ends or is closed. `trace`: the
        W3C traceparent the engine's own spans continue, if it makes any."""

    async def use_adapter(self, adapter: Adapter) -> None:
        """Make a LoRA adapter servable under its name (loaded once; again when its path changes); raise
        `raylm.errors.InvalidRequestError` naming it if it cannot load. The engine stays up either way."""

    def num_running(self) -> int:
        """Requests inside the engine now; drops when a request finishes or is aborted."""

    async def health(self) -> None:
        """Raise if the engine cannot serve."""

    def stalled_s(self) -> float:
        """Seconds the engine has held requests without finishing a step; 0 when it holds none."""

    async def shutdown(self) -> None: ...
