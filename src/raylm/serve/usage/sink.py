"""A process's usage records on their way to the Ledger: buffered, sent in batches off the request path.

    ingress replica / Batch API stage ── add(record) ──► buffer ──every flush_interval_s──► Ledger.record
                                                                 (a failed send stays buffered, up to max_buffered;
                                                                  past it the oldest records are dropped, counted)

What can be lost: the records of the last flush interval when this process dies (1 s by default), and records
dropped past `max_buffered` while the Ledger is unreachable. A request never waits for any of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from raylm.contract import UsageRecord

logger = logging.getLogger("raylm.serve")

SEND_TIMEOUT_S = 30.0
# A reservation's share of a request's prompt, as OpenAI estimates tokens for its rate limits: characters / 4.
CHARS_PER_TOKEN = 4
# Fields of a body that say how many tokens a request may generate, by API.
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def reserve_tokens(body: dict[str, Any]) -> int:
    """What a request reserves against tokens_per_minute when admitted: its body's characters / 4 (an upper
    bound of its prompt, as OpenAI estimates) and the most tokens it may generate (what it asked for)."""
    prompt = len(json.dumps(body, ensure_ascii=False, separators=(",", ":"))) // CHARS_PER_TOKEN
    asked = [v for k in MAX_TOKEN_FIELDS if isinstance(v := body.get(k), int) and not isinstance(v, bool)]
    return prompt + max(asked, default=0) * max(body.get("n") if isinstance(body.get("n"), int) else 1, 1)


class UsageSink:
    def __init__(self, ledger: Any, interval_s: float, max_buffered: int) -> None:
        self.ledger = ledger  # a Serve handle to the Ledger deployment
        self.interval_s, self.max_buffered = interval_s, max_buffered
        self.records: list[UsageRecord] = []
        self.settles: list[tuple[int, int]] = []  # quota tickets and the tokens the request really took
        self.dropped = 0
        self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, record: UsageRecord, ticket: int = 0) -> None:
        self.records.append(record)
        if ticket:
            self.settles.append((ticket, record.prompt_tokens + record.completion_tokens))
        if len(self.records) > self.max_buffered:
            drop = len(self.records) - self.max_buffered
            del self.records[:drop]
            self.dropped += drop
        # The same bound for settles: a dropped one leaves its reservation counted (an upper bound of what the
        # request took) until the quota's window passes it.
        del self.settles[:max(0, len(self.settles) - self.max_buffered)]

    async def flush(self) -> None:
        async with self._lock:  # one send at a time: records keep their order
            if not self.records and not self.settles:
                return
            records, settles = self.records, self.settles
            self.records, self.settles = [], []
            try:
                await asyncio.wait_for(self.ledger.record.remote(records, settles, self.dropped), SEND_TIMEOUT_S)
                self.dropped = 0
            except Exception as exc:  # the Ledger restarting or gone: keep them for the next try
                logger.warning("usage: %d records not yet sent (%r); kept for the next try", len(records), exc)
                self.records[:0], self.settles[:0] = records, settles

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:  # never let the loop die: usage keeps flowing after any failure
                logger.exception("usage flush failed")

    async def close(self) -> None:
        self._task.cancel()
        deadline = time.monotonic() + 5.0
        while (self.records or self.settles) and time.monotonic() < deadline:
            await self.flush()
            if self.records:
                await asyncio.sleep(0.5)
