"""A stream whose replica dies goes on from where its client is, on another replica (mid-stream resume).

    ingress ── Call(resumable) ──────► replica: its engine's token ids kept (Meter.ids); before each event's
                                       data, comment lines: `:r {"prompt": [ids], "id", "created"}` once,
                                       then `:t <ids>`, the token ids that event's text was made of
    ingress: Relayed strips the comment lines, relays whole events only, keeps the ids of those it relayed
    the replica dies (or its engine fails): the connection ends without a last event
    ingress ── Call(resume=Resume(prompt ids, ids relayed, id, created)) ──► another replica, first in its
               queue: a completions request of the prompt and the ids relayed, for the rest of max_tokens
               with the same sampling parameters; its chunks are rewritten as the original's (chat deltas,
               the same id, created and choice index), its usage the whole stream's

Nothing is tokenized again: the continuation's prompt is the engine's own token ids, so with greedy decoding
the client gets the tokens an unfaulted run makes, wherever that run is itself reproducible (batch
composition alone can change a greedy token on a CPU). With a `seed`, the continuation is sampled from the
same seed again: the text after the seam is a valid sample, not the unfaulted run's. Streams whose state is
more than their tokens end with the error event as before (`why_not`): n > 1, logprobs, tools, structured
output, stop strings (text held back at the seam), presence/frequency penalties and bad words (they count
the output's tokens only), a reasoning parser's split, and any field not carried over.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from raylm.contract import RESUME_MARK, TOKENS_MARK, Call, Endpoint, Resume, Usage

RESUMABLE: frozenset[Endpoint] = frozenset({"chat", "completions"})
# Carried to the continuation as they are: sampling that depends on nothing but the token ids so far.
CARRIED = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "stop_token_ids",
                     "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
                     "allowed_token_ids", "priority", "cache_salt", "return_token_ids"})
# Read here, or shaping the prompt only (its token ids carry them), or ignored by the engine.
HANDLED = frozenset({"model", "messages", "prompt", "stream", "stream_options", "n", "max_tokens",
                     "max_completion_tokens", "min_tokens", "user", "add_generation_prompt", "continue_final_message",
                     "add_special_tokens", "chat_template", "chat_template_kwargs", "documents", "echo",
                     "truncate_prompt_tokens", "parallel_tool_calls", "tool_choice", "response_format", "metadata",
                     "store", "service_tier", "request_id"})
COMPLETIONS_MAX_TOKENS = 16  # a completions request's max_tokens when it names none (vLLM's, as OpenAI's)
MAX_RESUMES = 2  # per stream


def why_not(endpoint: Endpoint, body: dict, reasoning_parser: str | None = None) -> str | None:
    """Why this request's stream cannot be resumed elsewhere (None: it can)."""
    if endpoint not in RESUMABLE or body.get("stream") is not True:
        return "not a chat or completions stream"
    for key, value in body.items():
        if key not in CARRIED and key not in HANDLED and value not in (None, False, 0, "", [], {}):
            return f"`{key}` is not carried over a resume"
    if body.get("n") not in (None, 1) or body.get("echo"):
        return "n > 1 or echo"
    if body.get("tools") or (body.get("response_format") or {}).get("type", "text") != "text":
        return "tools or structured output"
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        return "usage in every chunk"
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if body.get(key) is not None and (not isinstance(body[key], int) or isinstance(body[key], bool)):
            return f"`{key}` is not an integer"
    if endpoint == "completions" and not _one_prompt(body.get("prompt")):
        return "several prompts"
    if endpoint == "chat" and reasoning_parser:
        return "a reasoning parser splits the answer"
    return None


def _one_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return True  # token ids
    return isinstance(prompt, list) and len(prompt) == 1 and _one_prompt(prompt[0])


class Marks:
    """The replica's comment lines before each event of a resumable stream (sse_frames' `marks`): the ids the
    engine made since the last event that carried text, read from the request's Meter."""

    def __init__(self, meter: Any, call: Call) -> None:
        self.meter, self.call, self.sent, self.first = meter, call, 0, True

    def __call__(self, payload: str) -> str:
        out = ""
        if self.first:
            self.first = False
            r = self.call.resume
            if r is not None:
                head = {"prompt": list(r.prompt_ids), "id": r.id, "created": r.created}
            else:
                chunk = json.loads(payload)
                head = {"prompt": self.meter.prompt_ids, "id": chunk["id"], "created": chunk["created"]}
            out = RESUME_MARK + json.dumps(head, separators=(",", ":")) + "\n"
            if '"role":' in payload:  # vLLM's first chat event holds the role; its token's text comes next
                return out
        new = self.meter.ids[self.sent:]
        if new:
            self.sent += len(new)
            out += TOKENS_MARK + " ".join(map(str, new)) + "\n"
        return out


class Relayed:
    """The ingress's side: strips the marks, passes whole events on, and keeps what the client was sent."""

    __slots__ = ("head", "ids", "_rest")

    def __init__(self) -> None:
        self.head: dict | None = None
        self.ids: list[int] = []
        self._rest = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole events `chunk` completes, without their marks ("" while an event is incomplete)."""
        data = self._rest + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._rest = data
            return b""
        whole, self._rest = data[:end + 2], data[end + 2:]
        if not whole.startswith(b":") and b"\n:" not in whole:
            return whole
        out = []
        for event in whole.split(b"\n\n")[:-1]:
            kept = []
            for line in event.split(b"\n"):
                if line.startswith(b":t "):
                    self.ids.extend(map(int, line[3:].split()))
                elif line.startswith(b":r "):
                    if self.head is None:
                        self.head = json.loads(line[3:])
                elif not line.startswith(b":"):
                    kept.append(line)
            if kept:
                out.append(b"\n".join(kept) + b"\n\n")
        return b"".join(out)

    def resume(self) -> Resume | None:
        """Where the client is; None when it was sent no event yet (send the request again as it was)."""
        if self.head is None:
            return None
        return Resume(tuple(self.head["prompt"]), tuple(self.ids), self.head["id"], int(self.head["created"]))


def continuation(endpoint: Endpoint, body: dict, r: Resume) -> dict:
    """The completions body that goes on from `r`; raises ValueError when no token is left to make."""
    out = {k: body[k] for k in CARRIED if k in body}
    done = len(r.output_ids)
    if endpoint == "chat":
        wanted = body.get("max_completion_tokens")
        wanted = body.get("max_tokens") if wanted is None else wanted
    else:
        wanted = body.get("max_tokens", COMPLETIONS_MAX_TOKENS)
    if wanted is not None and wanted - done < 1:
        raise ValueError("the stream had all its tokens")
    out.update(model=body["model"], prompt=list(r.prompt_ids + r.output_ids), stream=True,
               max_tokens=None if wanted is None else wanted - done)
    if body.get("min_tokens"):
        out["min_tokens"] = max(0, body["min_tokens"] - done)
    if (body.get("stream_options") or {}).get("include_usage"):
        out["stream_options"] = {"include_usage": True}
    return out


def whole_usage(usage: Usage, r: Resume | None) -> Usage:
    """A continuation's usage as the whole stream's: its prompt the original's, its output all of it."""
    if r is None:
        return usage
    prompt = len(r.prompt_ids)
    return Usage(prompt, min(usage.cached_tokens, prompt), usage.completion_tokens + len(r.output_ids), usage.replica)


async def rewritten(payloads: AsyncIterator[str], call: Call) -> AsyncIterator[str]:
    """The continuation's completions chunks as the original stream's (`call.endpoint`, `call.resume`)."""
    r = call.resume
    assert r is not None
    ids = bool(call.body.get("return_token_ids"))
    async for payload in payloads:
        chunk = json.loads(payload)
        chunk["id"], chunk["created"] = r.id, r.created
        usage = chunk.get("usage")
        if usage:
            usage["prompt_tokens"] = len(r.prompt_ids)
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + len(r.output_ids)
            details = usage.get("prompt_tokens_details")
            if details and details.get("cached_tokens") is not None:
                details["cached_tokens"] = min(details["cached_tokens"], len(r.prompt_ids))
        if call.endpoint == "chat":
            chunk["object"] = "chat.completion.chunk"
            chunk["choices"] = [_chat_choice(c, ids) for c in chunk.get("choices", ())]
        else:
            for c in chunk.get("choices", ()):
                c["prompt_token_ids"] = None  # the first chunk had them
        yield json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


def _chat_choice(c: dict, ids: bool) -> dict:
    out = {"index": c.get("index", 0), "delta": {"content": c.get("text", "")}, "logprobs": None,
           "finish_reason": c.get("finish_reason")}
    if c.get("finish_reason") is not None:
        out["stop_reason"] = c.get("stop_reason")
    if ids:
        out["token_ids"] = c.get("token_ids")
    return out
