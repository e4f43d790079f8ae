"""Admission on one replica: a batch in the engine, a bounded weighted-fair queue before it, then 429.

    request ─► room for its sequences in the engine and nobody waiting? ─► run
            ─► others busy, and its tenant runs less than its share of all slots? ─► run in extra slots
                └─► its expected wait (the sequences ahead of it / the replica's recent finishing rate)
                    over max_queue_wait_s? ─► 429 now, Retry-After = that wait
                └─► wait in the queue, ordered by (priority, start tag)
                     queue full (requests or prompt tokens)? the waiter that would be served last is
                     refused with 429: the newcomer, or the latest request of a tenant over its share

Slots count sequences, not requests: `n` (and `best_of`) sequences run side by side in the engine. A
request of more sequences than there are slots runs alone.

Fair order is start-time fair queueing (Goyal, Vin, Cheng 1996): a tenant's request gets the start tag
max(virtual time, the tenant's previous finish tag) and the finish tag start + 1/weight; virtual time is
the start tag of the request that started last. A flooding tenant's requests get far-future tags, so a
light tenant's request lands at the front and waits only for a free slot. Tags are forgotten whenever the
queue drains: fairness is about contention now, not about yesterday's traffic.

Batch API work is a class below every priority: it starts only when its sequences fit, nobody waits,
fewer than `batch_max_running` batch sequences run and no interactive request has run for `batch_quiet_s`,
and otherwise is refused at once (it never queues, so it never delays a waiter); the batch runner retries it
later. On a CPU every sequence beside an interactive one lengthens the engine's steps (one batch sequence
doubled the interactive TTFT p99 on 2 cores), so batch work fills the pauses between interactive requests.

Fair order alone still makes a light tenant wait for the next slot to free up, about a request's length
divided by the batch size. The extra slots let it start at once: the engine's batch has room for them
(max_num_seqs is set above max_running + burst) and a flooding tenant, above its share, cannot take them.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from raylm import errors
from raylm.config import AdmissionConfig
from raylm.contract import Tenant

RATE_WINDOW = 64  # finishes the rate is measured over...
RATE_HORIZON_S = 30.0  # ...if they are this recent
RATE_MIN_SAMPLES = 8


@dataclass(order=True)
class _Waiter:
    key: tuple[float, float, int]  # (priority: -inf for a resumed stream, start tag, arrival)
    tenant: Tenant = field(compare=False)
    tokens: int = field(compare=False)
    sequences: int = field(compare=False)
    future: asyncio.Future = field(compare=False)


class Admission:
    def __init__(self, limits: AdmissionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.running_by: Counter[str] = Counter()  # sequences by tenant; a tenant with none is not a key
        self.queued_tokens = 0
        self.rejected: Counter[str] = Counter()  # by reason
        self._waiting: list[_Waiter] = []  # sorted by key; short (≤ max_queued), so a list is enough
        self._vtime = 0.0
        self._finish: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._seq = itertools.count()
        self._clock = clock
        self._finished_at: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)  # (time, sequences)
        self.batch_running = 0  # sequences of Batch API work
        self._batch_from = float("-inf")  # batch work may start from this time on (quiet after interactive)

    @property
    def running(self) -> int:
        return sum(self.running_by.values())

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, tenant: Tenant, tokens: int, sequences: int = 1, first: bool = False) -> AsyncIterator[None]:
        """Hold engine slots for a request's sequences during the block; may wait in the queue, or raise
        OverloadedError. `tokens`: its prompt tokens (they bound the queue). `first`: a stream resumed from
        another replica (resume.py), admitted there already: it takes an extra slot if one is free, else
        waits ahead of every other waiter, and is never refused for the wait."""
        self._weights[tenant.name] = tenant.weight
        if tenant.batch:
            self._start_batch(tenant, sequences)
        elif self._fits(sequences) and not self._waiting:
            self._vtime = self._start_tag(tenant)
            self._finish[tenant.name] = self._vtime + 1 / tenant.weight
            self._started(tenant.name, sequences)
        elif self._may_burst(tenant, sequences) or (
                first and self.running + sequences <= self.limits.max_running + self.limits.burst):
            # Served out of the queue's order: the tenant's tags advance, virtual time does not, or the
            # requests waiting in the queue would fall behind it.
            self._finish[tenant.name] = self._start_tag(tenant) + 1 / tenant.weight
            self._started(tenant.name, sequences)
        else:
            await self._wait(tenant, tokens, sequences, first)
        try:
            yield
        finally:
            if tenant.batch:
                self.batch_running -= sequences
            else:
                self._batch_from = self._clock() + self.limits.batch_quiet_s
            self._finished(tenant.name, sequences)

    def refuse_early(self, tenant: Tenant) -> None:
        """Raise now the OverloadedError `slot` is sure to raise for this tenant's next request, whatever its
        size: before the request is parsed and counted, so a refusal costs no tokenizing. Sure: the queue is
        full by count and the request would be served last, or what waits ahead of it already passes
        max_queue_wait_s. (Batch work is refused by `slot` at once, without waiting, anyway.)"""
        self._weights[tenant.name] = tenant.weight
        if tenant.batch or (self._fits(1) and not self._waiting) or self._may_burst(tenant, 1):
            return
        key = (tenant.priority, self._start_tag(tenant), float("inf"))  # after every waiter of its tag
        if len(self._waiting) >= self.limits.max_queued and key > self._waiting[-1].key:
            raise self._overloaded("queue_full")
        self._refuse_long_waits(_Waiter(key, tenant, 0, 1, asyncio.get_running_loop().create_future()))

    def _start_batch(self, tenant: Tenant, sequences: int) -> None:
        interactive = self.limits.batch_quiet_s > 0 and (
            self.running > self.batch_running or self._clock() < self._batch_from)
        if (self._waiting or interactive or not self._fits(sequences)
                or self.batch_running + sequences > max(self.limits.batch_max_running, sequences)):
            self.rejected["batch_deferred"] += 1
            raise errors.OverloadedError("batch work waits for free capacity", code="batch_deferred",
                                         retry_after=self.limits.retry_after_s)
        self.batch_running += sequences
        self._started(tenant.name, sequences)

    def _fits(self, sequences: int) -> bool:
        return self.running + sequences <= self.limits.max_running or self.running == 0

    def _may_burst(self, tenant: Tenant, sequences: int) -> bool:
        if self.running + sequences > self.limits.max_running + self.limits.burst:
            return False
        active = set(self.running_by) | {w.tenant.name for w in self._waiting}
        if not active - {tenant.name}:
            return False  # alone, a tenant has the whole batch already: extra slots are for sharing
        share = (self.limits.max_running + self.limits.burst) * tenant.weight / sum(
            self._weights[n] for n in active | {tenant.name})
        mine = self.running_by[tenant.name]
        return mine == 0 or mine + sequences <= share

    def _started(self, name: str, sequences: int) -> None:
        self.running_by[name] += sequences

    def _finished(self, name: str, sequences: int) -> None:
        self.running_by[name] -= sequences
        if self.running_by[name] <= 0:
            del self.running_by[name]
        self._finished_at.append((self._clock(), sequences))
        self._dispatch()

    def finishing_rate(self) -> float | None:
        """Sequences finished per second over the last RATE_WINDOW finishes of the last RATE_HORIZON_S;
        None until RATE_MIN_SAMPLES are seen (after an idle spell, too: idleness says nothing of capacity)."""
        finished, horizon = self._finished_at, self._clock() - RATE_HORIZON_S
        while finished and finished[0][0] < horizon:
            finished.popleft()
        if len(finished) < RATE_MIN_SAMPLES:
            return None
        span = finished[-1][0] - finished[0][0]
        return sum(n for _, n in itertools.islice(finished, 1, None)) / span if span > 0 else None

    def expected_wait(self, waiter_key: tuple, sequences: int) -> float | None:
        """Seconds a request would wait for its slots: the sequences queued ahead of it and its own, less
        the free slots, at the recent finishing rate. None when the rate is not known yet."""
        rate = self.finishing_rate()
        if rate is None:
            return None
        ahead = sum(w.sequences for w in self._waiting if w.key < waiter_key)
        return max(0, ahead + sequences - max(0, self.limits.max_running - self.running)) / rate

    def _start_tag(self, tenant: Tenant) -> float:
        return max(self._vtime, self._finish.get(tenant.name, self._vtime))

    async def _wait(self, tenant: Tenant, tokens: int, sequences: int, first: bool = False) -> None:
        start = self._start_tag(tenant)
        waiter = _Waiter((-math.inf if first else tenant.priority, start, next(self._seq)), tenant, tokens, sequences,
                         asyncio.get_running_loop().create_future())
        if not first:
            self._refuse_long_waits(waiter)
        self._make_room(waiter)
        bisect.insort(self._waiting, waiter)
        self.queued_tokens += tokens
        self._finish[tenant.name] = start + 1 / tenant.weight
        try:
            await waiter.future
        except asyncio.CancelledError:  # the client went away while waiting (or its slot was just granted)
            if waiter in self._waiting:
                self._remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._finished(tenant.name, sequences)
            raise

    def _refuse_long_waits(self, newcomer: _Waiter) -> None:
        bound = self.limits.max_queue_wait_s
        wait = self.expected_wait(newcomer.key, newcomer.sequences) if bound is not None else None
        if wait is not None and wait > bound:
            self.rejected["queue_wait"] += 1
            raise errors.OverloadedError(
                f"the server is at capacity: this request would wait about {wait:.1f}s for a slot (more than "
                f"{bound:g}s); retry later", code="queue_wait", retry_after=max(wait, self.limits.retry_after_s))

    def _make_room(self, newcomer: _Waiter) -> None:
        """Refuse whoever would be served last until the newcomer fits, or refuse the newcomer."""
        if newcomer.tokens > self.limits.max_queued_tokens:
            raise self._overloaded("queue_tokens_full")
        while self._full(newcomer.tokens):
            last = self._waiting[-1] if self._waiting else None
            reason = "queue_full" if len(self._waiting) >= self.limits.max_queued else "queue_tokens_full"
            if last is None or newcomer.key > last.key:
                raise self._overloaded(reason)
            self._remove(last)
            # The refused request was its tenant's latest: give the tenant its tag back.
            self._finish[last.tenant.name] = last.key[1]
            last.future.set_exception(self._overloaded(reason))

    def _full(self, tokens: int) -> bool:
        return (len(self._waiting) >= self.limits.max_queued
                or self.queued_tokens + tokens > self.limits.max_queued_tokens)

    def _overloaded(self, reason: str) -> errors.OverloadedError:
        self.rejected[reason] += 1
        what = "requests" if reason == "queue_full" else "prompt tokens"
        return errors.OverloadedError(f"the server is at capacity (its queue of {what} is full); retry later",
                                      code=reason, retry_after=self.limits.retry_after_s)

    def _remove(self, waiter: _Waiter) -> None:
        self._waiting.remove(waiter)
        self.queued_tokens -= waiter.tokens

    def _next(self) -> _Waiter | None:
        """The waiter to start now: the head in fair order if its sequences fit, or else the first waiter
        whose tenant may take extra slots (a head over its share must not block a tenant under it)."""
        if self._fits(self._waiting[0].sequences):
            return self._waiting[0]
        return next((w for w in self._waiting if self._may_burst(w.tenant, w.sequences)), None)

    def _dispatch(self) -> None:
        while self._waiting and (waiter := self._next()) is not None:
            head = waiter is self._waiting[0]
            self._remove(waiter)
            if waiter.future.done():  # cancelled; its task has not run its cleanup yet
                continue
            if head:  # out of order, it is a burst: virtual time stays, as in `slot`
                self._vtime = waiter.key[1]
            self._started(waiter.tenant.name, waiter.sequences)
            waiter.future.set_result(None)
        if not self._waiting:
            self._finish.clear()
            self._weights = {n: w for n, w in self._weights.items() if n in self.running_by}


class Turns:
    """One request at a time through the replica's counting thread (engine.prepare), tenants in turn: each
    tenant waiting gets its oldest request through before any tenant gets a second, so one tenant's huge
    bodies delay only its own requests."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._order: deque[str] = deque()  # tenants with requests waiting, in turn order
        self._busy = False

    @asynccontextmanager
    async def turn(self, tenant: str) -> AsyncIterator[None]:
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            if tenant not in self._waiting:
                self._order.append(tenant)
            self._waiting.setdefault(tenant, deque()).append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted, then cancelled: pass the turn on
                    self._next()
                raise
        self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        while self._order:
            tenant = self._order.popleft()
            queue = self._waiting[tenant]
            future = queue.popleft()
            if queue:
                self._order.append(tenant)
            else:
                del self._waiting[tenant]
            if not future.done():  # a cancelled waiter is skipped
                future.set_result(None)
                return
        self._busy = False
