"""The one contract across the serving boundary, and the wire format, written once.

    ingress, Batch API stage ── Call ──────────────► ModelServer.reply(call)   a Serve handle call; a router
                                                                               reads call.body, never guesses
                             ◄── Reply ─────────────  a whole answer (its Usage beside it), or an error with its code
                             ◄── Direct(host, port, ticket) ··· SSE bytes on a direct connection (serve/stream.py)
                             ◄── Usage ─────────────  when that stream has ended (or was cut off by its client)
    ingress, Batch API stage ── UsageRecord ───────► the usage store (serve/usage/), in batches, off the request path

    SSE, as clients read it:  data: <chunk JSON>\\n\\n ... data: [DONE]\\n\\n
    named-event APIs (Responses, Anthropic Messages):  event: <type>\\ndata: <JSON>\\n\\n ... (no [DONE])
    an error mid-stream:  one error event (`event: error` first on a named stream), then the end

Everything that crosses a process boundary between raylm's parts is a frozen value defined here: the edge,
the replica, the Batch API, the router, the builder and the engine import this module; it imports none of
them (only `raylm.errors`). A field added to a Call (trace context, adapter, key id) is added here, once.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from raylm import errors

Endpoint = Literal["chat", "completions", "responses", "messages", "count_tokens", "embeddings", "score", "rerank",
                   "tokenize", "detokenize"]

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

# How the parts find each other in Serve: the application and its deployments' names.
APP_NAME = "raylm"
INGRESS_NAME = "ingress"
BATCH_NAME = "batches"
LEDGER_NAME = "usage"


def deployment_name(model_name: str) -> str:
    """A model's Serve deployment."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


@dataclass(frozen=True)
class Tenant:
    """Who a request is for; the ingress resolves it from the API key (or a header without auth)."""

    name: str = "default"
    weight: float = 1.0
    priority: int = 0
    batch: bool = False  # Batch API work, for this tenant: the lowest class


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter of the called model: its name (the body's `model`) and folder, which the replica loads
    on first use (on the replica's node: the same path on every node, as a model's own source)."""

    name: str
    path: str


@dataclass(frozen=True)
class Call:
    """One request for a model replica (`ModelServer.reply`)."""

    endpoint: Endpoint
    body: dict[str, Any]  # the client's JSON body, `model` resolved
    request_id: str
    tenant: Tenant = field(default_factory=Tenant)
    adapter: Adapter | None = None  # the body's `model` names this adapter of the deployment's model
    key_id: str = ""  # which API key (an id derived from its hash, never the key); "" without keys
    trace: str | None = None  # W3C `traceparent` of the caller's span, when tracing is on
    resumable: bool = False  # the ingress can resume this stream elsewhere: mark its frames (RESUME_MARK)
    resume: Resume | None = None  # continue a cut stream from where its client is
    avoid: str = ""  # a replica not to route to unless it is the only one (the one that just cut its stream)


@dataclass(frozen=True)
class Resume:
    """A stream cut mid-way (its replica died), to continue on another replica: the prompt as the engine saw
    it and the tokens the client has, as token ids (nothing is tokenized again), and the ids the client's
    chunks carry."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    id: str  # the stream's `id` and `created`, kept in every chunk after the seam
    created: int


@dataclass(frozen=True)
class Usage:
    """The tokens a request took, as its engine counted them: what its answer's `usage` says (prompt_tokens,
    prompt_tokens_details.cached_tokens, completion_tokens), and for a stream its client cut off, what the
    engine made for it before the abort."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    replica: str = ""  # which replica ran it


@dataclass(frozen=True)
class UsageRecord:
    """One request, as the usage store keeps it (and the access log writes it): never a prompt, an output or
    a key."""

    time: float  # when the request came in, Unix seconds
    request_id: str
    tenant: str
    key_id: str  # "" without keys
    model: str  # the model a request reached ("" when refused before one was known)
    adapter: str  # the LoRA adapter it named, "" for none
    route: str  # an Endpoint
    status: int  # HTTP status; 499: the client went away; a stream cut mid-way: 500
    error_code: str  # "" on success
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # to the first byte of a stream's answer; None for a whole answer
    duration_s: float = 0.0  # to the last byte
    batch: bool = False  # a Batch API line
    replica: str = ""
    trace_id: str = ""
    resumes: int = 0  # a stream's continuations on another replica after its replica's end (serve/resume.py)


@dataclass(frozen=True)
class Reply:
    """A whole answer: a body (JSON), or an error whose `code` travels beside its body (never parsed back)."""

    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    code: str | None = None  # an error's code: queue_full, batch_deferred, model_not_found, ...
    message: str | None = None  # an error's message
    usage: Usage | None = None  # what the engine counted, when it ran the request

    @classmethod
    def of(cls, exc: Exception, request_id: str) -> Reply:
        """Any exception as an error reply; internals are logged with the request id and never shown."""
        err = errors.public_error(exc, request_id)
        return cls(json.dumps(err.body()).encode(), err.status, err.headers(), err.code, err.message)

    @property
    def ok(self) -> bool:
        return self.status < 400


@dataclass(frozen=True)
class Direct:
    """A stream waiting at a replica: connect to (host, port) and send `ticket` to receive its SSE bytes."""

    host: str
    port: int
    ticket: bytes
    replica: str = ""  # which replica (its unique id)


# --- SSE ---------------------------------------------------------------------------------------------------

DONE = "data: [DONE]\n\n"
# A resumable stream's events, replica → ingress, carry SSE comment lines before their data (clients ignore
# comments; the ingress strips them): the first `:r {"prompt": [ids], "id": .., "created": ..}`, then each
# `:t <ids>`, the token ids its data's text was made of (serve/resume.py).
RESUME_MARK = ":r "
TOKENS_MARK = ":t "


def sse_event(payload: str, named: bool = False) -> str:
    """One chunk payload (JSON text) as an SSE event; named: the event is named by the payload's `type`."""
    if named:
        return f"event: {json.loads(payload).get('type', 'message')}\ndata: {payload}\n\n"
    return f"data: {payload}\n\n"


def error_event(exc: Exception, request_id: str, named: bool = False) -> str:
    body = json.dumps(errors.public_error(exc, request_id).body())
    return ("event: error\n" if named else "") + f"data: {body}\n\n"


async def sse_frames(payloads: AsyncIterator[str], request_id: str, named: bool = False,
                     marks: Callable[[str], str] | None = None) -> AsyncIterator[str]:
    """Chunk payloads as SSE events, then `[DONE]` (not on named streams, whose SDKs read the names); an
    error becomes one error event and ends the stream. Closing this closes `payloads` (an engine abort).
    `marks(payload)`: comment lines to put before the payload's event (a resumable stream's token ids); such
    a stream whose engine fails (not a 4xx) ends cut, without a last event, so the ingress resumes it."""
    async with contextlib.aclosing(payloads):
        try:
            async for payload in payloads:
                yield sse_event(payload, named) if marks is None else marks(payload) + sse_event(payload, named)
        except Exception as exc:  # the engine failed mid-stream
            if marks is not None and not (isinstance(exc, errors.APIError) and exc.status < 500):
                raise StreamAborted from exc
            yield error_event(exc, request_id, named)
            return
    if not named:
        yield DONE


class StreamAborted(Exception):
    """A resumable stream's engine failed: end its connection without a last event (resumed elsewhere)."""


def sse_payload(frame: str) -> str | None:
    """A producer's SSE frame (vLLM's serving classes yield them, `event:` lines too) → its bare payload;
    None for a frame with none or for `[DONE]`; an error event raises it as an APIError."""
    if frame.startswith("event:"):
        frame = frame.partition("\n")[2]
    payload = frame[len("data: "):].rstrip("\n") if frame.startswith("data: ") else frame.strip()
    if not payload or payload == "[DONE]":
        return None
    if payload.startswith('{"error"'):
        err = json.loads(payload)["error"]
        raise errors.from_status(int(err.get("code") or 500), err["message"], err.get("param"))
    return payload


# A finished stream's last event opens so (sse_frames): `[DONE]` or an error event; a named-event stream
# (Responses, Anthropic Messages) ends with its API's last event, or an error event. Anything else: cut.
_LAST_EVENTS = (DONE.rstrip("\n").encode(), b'data: {"error"', b"event: error\n", b"event: response.completed\n",
                b"event: response.failed\n", b"event: response.incomplete\n", b"event: message_stop\n")
_HEAD_BYTES = 64  # of each event: enough to tell which it is


class LastEvent:
    """Follows SSE bytes as they pass, keeping only the head of the last whole event and of the one coming:
    enough to tell a finished stream from a cut one, however long its events (a Responses stream's last
    event carries the whole answer)."""

    __slots__ = ("last", "current", "_carry")

    def __init__(self) -> None:
        self.last = b""  # the first bytes of the last whole event
        self.current = b""  # the first bytes of the event in progress ("" between events)
        self._carry = b""  # the previous chunk's last byte: a blank line may straddle two chunks

    def feed(self, chunk: bytes) -> None:
        data, start = self._carry + chunk, len(self._carry)
        begin = 0  # where the event in progress began within data (or 0: before it)
        while (end := data.find(b"\n\n", max(begin, start - 1))) != -1:
            self.last = (self.current + data[max(begin, start):end])[:_HEAD_BYTES]
            self.current, begin = b"", end + 2
        if len(self.current) < _HEAD_BYTES:
            self.current = (self.current + data[max(begin, start):])[:_HEAD_BYTES]
        self._carry = data[-1:]

    def finished(self) -> bool:
        return not self.current and self.last.startswith(_LAST_EVENTS)


def finished(data: bytes) -> bool:
    """Whether SSE bytes end with a whole last event (see LastEvent)."""
    events = LastEvent()
    events.feed(data)
    return events.finished()

