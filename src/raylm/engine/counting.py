"""Counting a request's prompt tokens before it takes a queue place: bounded work, whatever the body.

    the body's prompt texts (every field a chat template renders: contents, tool calls, tools, documents)
      └─ chars / the longest token's bytes > the context?  ─► too long, nothing tokenized
      └─ tokenized in slices of SLICE_CHARS (cut at a space), stopping once clearly over the context

A token covers at most `max_token_bytes` bytes of text (the longest vocabulary entry; byte-level and
SentencePiece vocabularies store one character per byte or more), so a text of c characters holds at least
c / max_token_bytes tokens: a 16 MiB body for a 4k-context model is refused without tokenizing any of it.
Slicing at spaces keeps a word whole (pre-tokenizers split there): a sliced count is within a token or two
per slice of the whole one, and a count that close to the limit is redone whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

SLICE_CHARS = 16_384
# A body whose strings and items come to no more (a character or an item each) is prepared on the replica's
# loop: well under a millisecond there, where a turn on the counting thread waited for the others' turns and
# for the GIL the loop holds while it relays tokens (up to Python's 5 ms switch interval per hand-over).
SMALL_BODY = 8192

Encode = Callable[[str], list[int]]


def chat_texts(body: dict) -> list[str]:
    """What a chat template renders into the prompt: each message's text (content parts, tool calls, a name)
    and the request's tools and documents (as the JSON the template writes)."""
    texts: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        for part in content if isinstance(content, list) else [content]:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                texts.append(text)
        for key in ("name", "reasoning_content"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts += [v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str)]
    for key in ("tools", "documents"):
        if body.get(key) is not None:
            texts.append(json.dumps(body[key], ensure_ascii=False))
    return texts


def prompts(endpoint: str, body: dict) -> list[list[str] | list[int]]:
    """Each prompt of a completions or embeddings request: its text(s), or its token ids."""
    value = body.get("prompt" if endpoint == "completions" else "input")
    items = value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
    out: list[list[str] | list[int]] = []
    for item in items:
        if isinstance(item, str):
            out.append([item])
        elif isinstance(item, list) and all(isinstance(i, int) for i in item):
            out.append(item)  # token ids
        else:
            out.append([])
    return out


def count(encode: Encode, texts: list[str], budget: int, max_token_bytes: int) -> int:
    """Tokens of `texts` together; once over `budget` (> 0) it may stop early and return any count above it."""
    chars = sum(len(t) for t in texts)
    if budget > 0 and chars > (budget + 1) * max_token_bytes:
        return chars // max_token_bytes  # at least this many: over the budget without tokenizing
    total, slices = 0, 0
    for text in texts:
        for piece in _slices(text):
            total += len(encode(piece))
            slices += 1
            if budget > 0 and total - 2 * slices > budget:
                return total - 2 * slices  # surely over
    if slices > len(texts) and budget > 0 and abs(total - budget) <= 2 * slices:
        return sum(len(encode(t)) for t in texts)  # near the limit: the exact count decides
    return total


def within(body: Any, budget: int) -> bool:
    """Whether `body`'s strings and items come to at most `budget` (a character or an item each). Bounded
    work whatever the body: it stops once over, and a list longer than what is left is not walked."""
    stack = [body]
    while stack:  # a loop, not recursion: bodies may be nested deeply
        value = stack.pop()
        budget -= len(value) if isinstance(value, str) else 1
        if budget < 0:
            return False
        if isinstance(value, dict | list) and len(value) > budget:
            return False
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True


def _slices(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > SLICE_CHARS:
        cut = text.rfind(" ", start + SLICE_CHARS // 2, start + SLICE_CHARS)
        cut = cut if cut > start else start + SLICE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def max_token_bytes(tokenizer: Any) -> int:
    """The longest vocabulary entry (at least 1): no token covers more characters of text."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, ValueError, TypeError):
        return 256
