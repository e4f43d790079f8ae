"""Routing to model replicas: bursts spread (every model), and prefix-aware routing (`routing: prefix`): a
request goes to the model replica whose engine already holds its prompt's start.

    request ─► prompt text (system/instructions, then each turn; the first max_chars)
            ─► full blocks of block_chars, hashed as a chain: h1 = H(endpoint, b1), h2 = H(h1, b2), ...
            ─► for each replica not overloaded (its queue ≤ the shortest queue + imbalance):
                   how many leading hashes of the chain it was sent before
                   ├─ someone holds ≥ 1 block ─► the longest holder (ties: the shorter queue)
                   │                              [at max_ongoing_requests: Serve tries two others]
                   └─ nobody ─► the one holding the fewest blocks (ties: the shorter queue), so new
                                prefixes spread over the replicas and their caches add up
            no full block (a short prompt) ─► the shorter queue of two random replicas (power of two)
    chosen ─► counted as pending on that replica until Serve sends it (or for PENDING_S at most)
    sent and accepted ─► the chosen replica now holds the request's chain (its own LRU of block hashes)

    a LoRA adapter's request (every model): its adapter as a chain of one block, in an LRU per replica of
    max_cpu_loras ─► a holder within imbalance; none ─► its home replica (adapter_home: rendezvous hashing)

A chain hash covers every block before it, like vLLM's block hashes, so "holds h_k" means "holds the first k
blocks". Each ingress replica's router learns only from what it routed: no shared index, no actor on the
request path (Ray Serve LLM's PrefixCacheAffinityRouter asks a tree actor, with blocking calls, per
request). With several ingress replicas a prefix may be placed once by each: a bounded cost.

Queue lengths come from Serve's cache (updated as the router sends, and by each replica's answer to it);
an unknown one (none for 10 s) counts as empty: nobody sent there lately. To each, the router adds the
requests it chose that replica for and Serve has not sent yet (`Pending`; why: `PendingAware`). The LRU
mirrors vLLM's eviction: a chain is recorded tail first, so a prefix's first blocks are the last forgotten,
as vLLM frees a request's blocks tail first. Knobs (Serve's request_router_kwargs): block_chars, max_chars, imbalance,
capacity_blocks. The pure parts (prompt_text, block_chain, PrefixIndex, prefer) are tested without Ray.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID,
                                      RequestRouter, RunningReplica)

from raylm.contract import Call

logger = logging.getLogger("raylm.serve")

BLOCK_CHARS = 256  # ~60 tokens of English: a shared start shorter than that is not worth a detour
MAX_CHARS = 32_768  # ~8k tokens hashed at most: enough to tell system prompts and chats apart, and cheap
IMBALANCE = 8  # extra requests on the holder before its cache stops being worth the wait
# The same for a LoRA adapter: loading one costs less than a prefix's prefill (a rank-8 SmolLM2 adapter reads
# 20 MB), and at 8 a replica took every request of a hot adapter (benchmarks/lora.py, zipf: TTFT p99).
ADAPTER_IMBALANCE = 2
CAPACITY_BLOCKS = 4096  # per replica: ~1M chars, ~250k tokens, a large engine's KV cache
PENDING_S = 2.0  # a choice Serve did not act on (the replica was full, the request cancelled) is forgotten

K = TypeVar("K", bound=Hashable)


def prompt_text(body: Any, max_chars: int = MAX_CHARS) -> str:
    """The start of a request's prompt as plain text, in the order a chat template lays it out: chat
    `messages`, Responses `instructions` + `input`, Anthropic `system` + `messages`, completions `prompt`
    (token ids as numbers). Only text parts of content lists count. "" for anything else; never raises."""
    if not isinstance(body, dict):
        return ""
    out: list[str] = []
    left = max_chars
    try:
        for n, piece in enumerate(_pieces(body)):
            out.append(piece[:left])
            left -= len(out[-1])
            if left <= 0 or n >= max_chars:  # also bounds a body of many empty parts
                break
    except Exception:  # a shape nobody foresaw routes like an unknown prompt, never fails the request
        return ""
    return "".join(out)


def _pieces(body: dict) -> Iterator[str]:
    for key in ("instructions", "system", "messages", "input", "prompt"):
        value = body.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and ("content" in item or "role" in item):  # a turn
                yield f"\x1e{item.get('role', '')}\x1f"  # separators no prompt text holds
                yield from _texts(item.get("content"))
            else:
                yield from _texts(item)


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, int) and not isinstance(value, bool):  # a token id
        yield f"{value},"
    elif isinstance(value, dict) and isinstance(value.get("text"), str):  # a text part
        yield value["text"]
    elif isinstance(value, list):  # parts of one content, or one prompt's token ids
        for part in value:
            if not isinstance(part, list):
                yield from _texts(part)


def block_chain(text: str, block_chars: int = BLOCK_CHARS, seed: str = "") -> tuple[int, ...]:
    """One hash per full block; each covers the blocks before it (and `seed`: the endpoint, whose
    template differs). Python's hash: fast, and stable within the process that routes."""
    chain, h = [], hash(seed)
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start:start + block_chars]))
        chain.append(h)
    return tuple(chain)


class PrefixIndex:
    """Per replica, the block hashes it was sent: a bounded LRU."""

    def __init__(self, capacity_blocks: int = CAPACITY_BLOCKS) -> None:
        self.capacity = capacity_blocks
        self._held: dict[Hashable, OrderedDict[int, None]] = {}

    def record(self, replica: Hashable, chain: Sequence[int]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for h in reversed(chain):  # tail first: the first blocks end most recent, the last evicted
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def matched(self, replica: Hashable, chain: Sequence[int]) -> int:
        """How many leading blocks of `chain` the replica holds."""
        held = self._held.get(replica, {})
        n = 0
        while n < len(chain) and chain[n] in held:
            n += 1
        return n

    def blocks(self, replica: Hashable) -> int:
        return len(self._held.get(replica, ()))

    def keep(self, replicas: Iterable[Hashable]) -> None:
        """Forget every replica not in `replicas` (gone, or replaced)."""
        alive = set(replicas)
        for replica in [r for r in self._held if r not in alive]:
            del self._held[replica]


def call_of(pending_request: PendingRequest | None) -> Call | None:
    """The Call a request to a model deployment carries (`ModelServer.reply(call)`), if it is one."""
    call = pending_request.args[0] if pending_request is not None and pending_request.args else None
    return call if isinstance(call, Call) else None


def adapter_name(pending_request: PendingRequest | None) -> str | None:
    call = call_of(pending_request)
    return call.adapter.name if call is not None and call.adapter is not None else None


def adapter_block(name: str | None) -> tuple[int, ...]:
    """A LoRA adapter (by name) as a chain of one block, for `prefer`; () for none."""
    return () if name is None else (hash(("adapter", name)),)


def adapter_home(name: str, replica: ReplicaID) -> int:
    """Where an adapter no replica holds goes (lowest first): rendezvous hashing, the same order in every
    ingress process (a stable hash, not Python's salted one), so the adapters are split over the replicas
    and each replica's cache of max_cpu_loras holds its share instead of every adapter passing through it.
    Measured (benchmarks/lora.py, Zipf over 8 adapters, 2 replicas of max_cpu_loras 2): docs/lora.md."""
    digest = hashlib.blake2b(f"{name}\x00{replica.unique_id}".encode(), digest_size=8).digest()
    return -int.from_bytes(digest, "big")  # not CRC32: it is linear, names alike kept the same order


class Pending:
    """Requests a replica was chosen for and Serve has not sent yet, each forgotten after `ttl_s`."""

    def __init__(self, ttl_s: float = PENDING_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._chosen: dict[Hashable, deque[float]] = {}

    def chosen(self, replica: Hashable) -> None:
        self._chosen.setdefault(replica, deque()).append(self.clock())

    def sent(self, replica: Hashable) -> None:
        """Serve sent one (its queue-length cache counts it from now): the oldest choice is done."""
        if self._chosen.get(replica):
            self._chosen[replica].popleft()

    def count(self, replica: Hashable) -> int:
        chosen = self._chosen.get(replica)
        if not chosen:
            return 0
        stale = self.clock() - self.ttl_s
        while chosen and chosen[0] < stale:
            chosen.popleft()
        return len(chosen)

    def keep(self, replicas: Iterable[Hashable]) -> None:
        alive = set(replicas)
        for replica in [r for r in self._chosen if r not in alive]:
            del self._chosen[replica]


def prefer(chain: Sequence[int], candidates: Sequence[K], loads: Mapping[K, int], index: PrefixIndex,
           imbalance: int = IMBALANCE, home: Callable[[K], Any] | None = None) -> K | None:
    """Among the candidates whose load is within `imbalance` of the least loaded: the one holding the longest
    start of `chain`; when none holds any, the one holding the fewest blocks (a new prefix goes where it
    evicts least: measured, Serve's random pair instead left the replicas' caches 151k / 112k tokens apart
    and the hit rate at 0.90), or the lowest `home(candidate)` when given; ties: the less loaded, then the
    earlier. None for an empty chain."""
    if not chain or not candidates:
        return None
    floor = min(loads.get(c, 0) for c in candidates)
    eligible = [c for c in candidates if loads.get(c, 0) - floor <= imbalance]
    matched = {c: index.matched(c, chain) for c in eligible}
    if any(matched.values()):
        return min(eligible, key=lambda c: (-matched[c], loads.get(c, 0)))
    return min(eligible, key=lambda c: (home(c) if home else index.blocks(c), loads.get(c, 0)))


class PendingAware(RequestRouter):
    """A request router that counts, per replica, the requests it chose it for and Serve has not sent yet.

    Serve's own router (measured, 2 replicas of the tiny model): 24 streams sent at once to a fresh service
    ran 14 / 0 on the two replicas, and 18 / 0 then 18 / 6 on a warm one. Its routing task chooses for every
    waiting request in a row, from the queue-length cache, and a choice enters that cache only when its
    request is sent, after the routing task has chosen for the rest; a candidate with no entry is probed in
    the background while the one with an entry is taken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()  # Serve calls it again with the deployment's kwargs

    def initialize_state(self, adapter_capacity: int = 1, **kwargs: Any) -> None:
        self.pending = Pending()
        # Per replica, the LoRA adapters it was sent, as many as it keeps loaded (lora.max_cpu_loras).
        self.adapters = PrefixIndex(adapter_capacity)

    def loads(self, replica_ids: Iterable[ReplicaID]) -> dict[ReplicaID, int]:
        """Queue lengths as Serve's cache has them (unknown: 0), plus the choices not yet sent."""
        cache = self.replica_queue_len_cache
        return {i: (cache.get(i) or 0) + self.pending.count(i) for i in replica_ids}

    @staticmethod
    def usable(candidates: list[RunningReplica], pending_request: PendingRequest | None) -> list[RunningReplica]:
        """The candidates less the replica the request's Call avoids (the one that just cut its stream: Serve
        may not know yet that it died), unless it is the only one."""
        call = call_of(pending_request)
        avoid = call.avoid if call is not None else ""
        rest = [r for r in candidates if r.replica_id.unique_id != avoid] if avoid else candidates
        return rest or candidates

    def chosen(self, pick: RunningReplica, others: Sequence[RunningReplica]) -> list[list[RunningReplica]]:
        """Serve's ranks for a pick: the pick first, then up to two others (tried when the pick is full)."""
        self.pending.chosen(pick.replica_id)
        rest = [r for r in others if r.replica_id != pick.replica_id][:2]
        return [[pick], rest] if rest else [[pick]]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.pending.sent(replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        adapter = adapter_block(adapter_name(pending_request))
        if adapter:
            self.adapters.record(replica_id, adapter)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.pending.keep(self.curr_replicas)
        self.adapters.keep(self.curr_replicas)


class SpreadRouter(FIFOMixin, LocalityMixin, MultiplexMixin, PendingAware):
    """Every model deployment's request router (`routing: default`): Serve's power of two choices, with its
    FIFO order, locality and multiplexing rules, the choices not yet sent counted in each queue."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        local = [r for r in candidate_replicas if r.replica_id in ids]
        by_id = {r.replica_id: r for r in self.usable(local, pending_request)}
        if not by_id:
            return []
        name = adapter_name(pending_request)
        if name is not None:  # a LoRA adapter's request: a replica that holds it, unless its queue is much longer
            shuffled = random.sample(list(by_id), len(by_id))
            pick = prefer(adapter_block(name), shuffled, self.loads(shuffled), self.adapters,
                          ADAPTER_IMBALANCE, home=lambda replica: adapter_home(name, replica))
            return self.chosen(by_id[pick], [by_id[i] for i in shuffled])
        two = random.sample(list(by_id), min(2, len(by_id)))
        loads = self.loads(two)
        return self.chosen(by_id[min(two, key=lambda i: loads[i])], [by_id[i] for i in two])


class PrefixAffinityRouter(PendingAware):
    """The request router for `routing: prefix` (builder.serve_options). Not FIFO: a replica chosen for a
    request's prefix goes to that request, not to the oldest one waiting."""

    def initialize_state(self, block_chars: int = BLOCK_CHARS, max_chars: int = MAX_CHARS,
                         imbalance: int = IMBALANCE, capacity_blocks: int = CAPACITY_BLOCKS,
                         adapter_capacity: int = 1) -> None:
        super().initialize_state(adapter_capacity)
        self.block_chars, self.max_chars, self.imbalance = block_chars, max_chars, imbalance
        self.index = PrefixIndex(capacity_blocks)

    def chain(self, pending_request: PendingRequest | None) -> tuple[int, ...]:
        """The chain of the prompt of the Call the request carries (`ModelServer.reply(call)`)."""
        call = call_of(pending_request)
        if call is None:
            return ()
        # A salted request (one tenant's cache, ingress.CacheSalt) shares blocks only with its own salt; an
        # adapter's, with its adapter's (vLLM's block hashes hold the adapter), whose own block comes first.
        adapter = call.adapter.name if call.adapter is not None else None
        seed = f"{call.endpoint}\x00{call.body.get('cache_salt') or ''}\x00{adapter or ''}"
        return adapter_block(adapter) + block_chain(prompt_text(call.body, self.max_chars), self.block_chars, seed)

    def match_on(self, pending_request: PendingRequest | None) -> tuple[Sequence[int], Any]:
        """The request's chain, and the index of what each replica holds to match it against."""
        return self.chain(pending_request), self.index

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every try sees every replica, so Serve may sleep between tries when all are full (its
            # default router's locality mixin sets this; without it the routing task would spin).
            pending_request.routing_context.should_backoff = True
        candidates = self.usable(candidate_replicas, pending_request)
        shuffled = random.sample(candidates, len(candidates))
        by_id = {r.replica_id: r for r in shuffled}
        loads = self.loads(by_id)
        try:
            name = adapter_name(pending_request)
            home = None if name is None else (lambda replica: adapter_home(name, replica))
            chain, index = self.match_on(pending_request)
            pick = prefer(chain, list(by_id), loads, index, self.imbalance, home)
        except Exception:  # an error here would strand the request: route it as if it had no prefix
            logger.exception("prefix routing failed; routing by queue length")
            pick = None
        if pick is None:  # power of two, the choices not yet sent counted
            pick = min(list(by_id)[:2], key=lambda i: loads[i])
        return self.chosen(by_id[pick], shuffled)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        try:
            self.index.record(replica_id, self.chain(pending_request))
        except Exception:  # learning is best effort: the request is already on its way
            logger.exception("prefix routing: could not record a routed request")

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.index.keep(self.curr_replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.keep(self.curr_replicas)


class KVEventRouter(PrefixAffinityRouter):
    """The request router for `routing: kv`: the prefix router, matching a prompt's block hashes, computed as
    the engine computes them, against what each replica's engine reports it holds (kv_events.py). A request
    whose engine hashes cannot be made here (see kv_events.PromptTokens; a LoRA adapter's; before the first
    events) is matched by its text, as with `prefix`."""

    def initialize_state(self, model_name: str = "", **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        from raylm.serve.edge import kv_events

        self.kv = kv_events
        self.model_name = model_name
        self.engines = kv_events.EngineIndex()
        self._wanted: dict[str, ReplicaID] = {}
        self._chains: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # by request id: tokenized once
        # Subscribed from the start (Serve makes a router with a handle's first call), so the view and the
        # tokenizer are ready for the next ones.
        self.subscriber: Any = kv_events.Subscriber(model_name, self.engines, lambda: self._wanted) \
            if model_name else None

    def engine_chain(self, pending_request: PendingRequest | None) -> tuple[int, ...]:
        call = call_of(pending_request)
        if call is None or call.adapter is not None or self.subscriber is None:
            return ()
        if call.request_id not in self._chains:
            self._chains[call.request_id] = self._engine_chain(call)
            while len(self._chains) > 1024:
                self._chains.popitem(last=False)
        return self._chains[call.request_id]

    def _engine_chain(self, call: Call) -> tuple[int, ...]:
        seeds = set(self.subscriber.seeds.values())
        sizes = set(self.engines.block_size.values())
        tokenize = self.subscriber.tokens
        if len(seeds) != 1 or len(sizes) != 1 or tokenize is None:  # nothing heard yet, or mixed hashing
            return ()
        (seed, algo), (block_size,) = next(iter(seeds)), sizes
        tokens = tokenize(call.endpoint, call.body) if algo in self.kv.HASH_ALGOS else None
        if not tokens:
            return ()
        return self.kv.block_hashes(tokens, block_size, seed, call.body.get("cache_salt") or None)

    def match_on(self, pending_request: PendingRequest | None) -> tuple[Sequence[int], Any]:
        chain = self.engine_chain(pending_request)
        return (chain, self.engines) if chain else super().match_on(pending_request)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        try:
            self.engines.expect(replica_id, self.engine_chain(pending_request))
        except Exception:
            logger.exception("kv routing: could not record a routed request")

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._wanted = {r.unique_id: r for r in self.curr_replicas}
        self.engines.keep(self.curr_replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.engines.keep(self.curr_replicas)
