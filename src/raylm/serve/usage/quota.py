"""Quotas per tenant: requests and tokens in any 60 s, tokens per UTC day. One `Quotas` for the whole service
(in the Ledger replica), so a limit holds across every ingress replica.

    admit(tenant, reserve) ─► requests in the last 60 s  < requests_per_minute?  else 429 rate_limit_exceeded
                              tokens in the last 60 s + reserve ≤ tokens_per_minute?  else 429 rate_limit_exceeded
                              tokens today < tokens_per_day?                          else 429 insufficient_quota
                           ─► admitted: the request's entry (time, reserved tokens) joins the window
    settle(ticket, tokens)  ─► the entry's tokens become the engine's count (the window and the day follow)

A sliding window of entries, not a token bucket: a bucket starting full admits up to twice its rate in the
first minute of a flood; here any 60 s holds at most the limit. `x-ratelimit-*` headers as OpenAI sends
them: the limit, what is left now, and how long until the window is empty again ("reset").
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

WINDOW_S = 60.0
DAY_S = 86400.0


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    ticket: int = 0  # settles the reservation (0: nothing reserved)
    code: Literal["rate_limit_exceeded", "insufficient_quota"] | None = None
    message: str = ""
    retry_after_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*


class _Entry:
    __slots__ = ("time", "tokens")

    def __init__(self, time: float, tokens: int) -> None:
        self.time, self.tokens = time, tokens


class _Tenant:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.window: deque[_Entry] = deque()
        self.tokens = 0  # in the window
        self.day = -1
        self.day_tokens = 0

    def prune(self, now: float) -> None:
        while self.window and self.window[0].time <= now - WINDOW_S:
            self.tokens -= self.window.popleft().tokens
        day = int(now // DAY_S)
        if day != self.day:
            self.day, self.day_tokens = day, 0


class Quotas:
    def __init__(self, limits: dict[str, Limits]) -> None:
        self.tenants = {name: _Tenant(lim) for name, lim in limits.items()}
        self._tickets: dict[int, tuple[_Tenant, _Entry, int]] = {}  # ticket → tenant, entry, its day
        self._next = 0

    def limited(self, tenant: str) -> bool:
        return tenant in self.tenants

    def admit(self, tenant: str, reserve: int, now: float) -> Decision:
        t = self.tenants.get(tenant)
        if t is None:
            return Decision(True)
        t.prune(now)
        lim = t.limits
        refusal = None
        if lim.requests_per_minute is not None and len(t.window) >= lim.requests_per_minute:
            wait = t.window[len(t.window) - lim.requests_per_minute].time + WINDOW_S - now
            refusal = ("rate_limit_exceeded", f"Rate limit reached for requests: limit {lim.requests_per_minute} "
                                              f"per min, used {len(t.window)}.", wait)
        elif lim.tokens_per_minute is not None and t.tokens + reserve > lim.tokens_per_minute:
            if reserve > lim.tokens_per_minute:
                refusal = ("rate_limit_exceeded", f"Request too large: limit {lim.tokens_per_minute} tokens per "
                                                  f"min, requested {reserve} (prompt estimate + max_tokens).", WINDOW_S)
            else:
                refusal = ("rate_limit_exceeded", f"Rate limit reached for tokens: limit {lim.tokens_per_minute} "
                                                  f"per min, used {t.tokens}, requested {reserve}.",
                           self._tokens_free_in(t, lim.tokens_per_minute - reserve, now))
        elif lim.tokens_per_day is not None and t.day_tokens >= lim.tokens_per_day:
            refusal = ("insufficient_quota", f"You exceeded your daily quota of {lim.tokens_per_day} tokens; it "
                                             "resets at 00:00 UTC.", (t.day + 1) * DAY_S - now)
        if refusal is not None:
            code, message, wait = refusal
            return Decision(False, code=code, message=message, retry_after_s=max(wait, 0.001),
                            headers=self._headers(t, now))
        entry = _Entry(now, reserve)
        t.window.append(entry)
        t.tokens += reserve
        t.day_tokens += reserve
        self._next += 1
        self._tickets[self._next] = (t, entry, t.day)
        return Decision(True, ticket=self._next, headers=self._headers(t, now))

    def settle(self, ticket: int, tokens: int, now: float) -> None:
        """The engine's count replaces what `admit` reserved (a refused or failed request's count is 0)."""
        held = self._tickets.pop(ticket, None)
        if held is None:
            return
        t, entry, day = held
        t.prune(now)
        change = tokens - entry.tokens
        if entry.time > now - WINDOW_S:  # still in the window
            t.tokens += change
        entry.tokens = tokens
        if day == t.day:
            t.day_tokens += change

    def count(self, tenant: str, tokens: int, now: float) -> None:
        """Tokens that took no reservation (Batch API lines) count toward the day."""
        t = self.tenants.get(tenant)
        if t is not None:
            t.prune(now)
            t.day_tokens += tokens

    def restore_day(self, used: dict[str, int], now: float) -> None:
        """Today's tokens as the usage store kept them, after a restart."""
        for name, tokens in used.items():
            t = self.tenants.get(name)
            if t is not None:
                t.prune(now)
                t.day_tokens += tokens

    def forget(self, older_than: float) -> None:
        """Reservations never settled (an ingress replica died mid-request) stop being tracked."""
        for ticket in [k for k, (_, e, _) in self._tickets.items() if e.time < older_than]:
            del self._tickets[ticket]

    def snapshot(self, now: float) -> dict[str, dict[str, int | None]]:
        """Each limited tenant's use now, for `raylm status` and the metrics."""
        out = {}
        for name, t in self.tenants.items():
            t.prune(now)
            out[name] = {"requests_per_minute": t.limits.requests_per_minute, "requests": len(t.window),
                         "tokens_per_minute": t.limits.tokens_per_minute, "tokens": t.tokens,
                         "tokens_per_day": t.limits.tokens_per_day, "tokens_today": t.day_tokens}
        return out

    @staticmethod
    def _tokens_free_in(t: _Tenant, target: int, now: float) -> float:
        """Seconds until the window's tokens fall to `target` as entries leave it."""
        tokens = t.tokens
        for entry in t.window:
            tokens -= entry.tokens
            if tokens <= target:
                return entry.time + WINDOW_S - now
        return WINDOW_S

    @staticmethod
    def _headers(t: _Tenant, now: float) -> dict[str, str]:
        lim, headers = t.limits, {}
        reset = (t.window[-1].time + WINDOW_S - now) if t.window else 0.0
        if lim.requests_per_minute is not None:
            headers["x-ratelimit-limit-requests"] = str(lim.requests_per_minute)
            headers["x-ratelimit-remaining-requests"] = str(max(lim.requests_per_minute - len(t.window), 0))
            headers["x-ratelimit-reset-requests"] = duration(reset)
        if lim.tokens_per_minute is not None:
            headers["x-ratelimit-limit-tokens"] = str(lim.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens"] = str(max(lim.tokens_per_minute - t.tokens, 0))
            headers["x-ratelimit-reset-tokens"] = duration(reset)
        return headers


def duration(seconds: float) -> str:
    """As OpenAI writes its reset times (Go's durations): 20ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{math.ceil(max(seconds, 0) * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"
