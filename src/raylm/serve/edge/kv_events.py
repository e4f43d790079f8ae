"""What each model replica's engine holds in its prefix cache, from the engine itself (`routing: kv`).

    replica's EngineCore ──(vLLM KV cache events: BlockStored / BlockRemoved / AllBlocksCleared, ZMQ PUB)──┐
    replica ──(its endpoints, hash seed, model folder: Ray's internal KV, once at start)───────────┐       │
    every ingress process: Subscriber thread ◄─ endpoints of the deployment's replicas (every 1 s) ┘       │
                                             ◄─ events ─────────────────────────────────────────────────────┘
                                             ─► EngineIndex: per replica, the block hashes its engine holds
    request ─► prompt token ids, as the engine makes them (the model's tokenizer and chat template)
            ─► block hashes with the engine's own hashing (vLLM's sha256 over pickle, chained from its
               NONE_HASH seed, cache_salt in the first block's extra keys), as 64-bit ints like the events'
            ─► routing.prefer: the replica holding the longest start, within the load imbalance

Every ingress process subscribes to every replica of the model, so they all hold the same view, built from
what the engines report, not from what each one routed; nothing on the request path calls an actor. Between
a routing decision and the engine's events for it (after the prefill), the request's blocks count as
expected on its replica for EXPECT_S, so a burst of one new prefix still lands on one replica.

What is lost, and what that costs (never a request, only a hit): events before this process subscribed
(a new ingress replica learns the blocks stored from then on), events dropped on a gap in the publisher's
sequence (the replica's view is cleared and learnt again), LoRA requests (their block hashes hold the
adapter's path, routed by adapter as with `prefix`), prompts with images, and endpoints other than chat and
completions (routed by queue length).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from raylm import _ray

logger = logging.getLogger("raylm.serve")

KEY_PREFIX = "raylm/kv-events/"
DEFAULT_SEED = "vllm-none-hash"  # vLLM's NONE_HASH seed for sha256 without PYTHONHASHSEED (kv_cache_utils.py)
HASH_ALGOS = ("sha256",)  # vLLM's default prefix_caching_hash_algo; the others: routed by queue length
MASK64 = (1 << 64) - 1  # events carry a block hash as its low 64 bits (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
EXPECT_S = 5.0  # a routed request's blocks count as held until its engine's events can have said so
DISCOVER_S = 1.0


def engine_config() -> dict[str, Any]:
    """The engine argument that makes it publish: a PUB socket on this node's IP (VLLM_HOST_IP: the replica
    sets it to Ray's node IP, 127.0.0.1 on a local cluster), on a port the OS picks (vLLM reports the bound
    endpoint back to its client: no port race). Its replay socket answers a subscriber that missed events."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0",
            "replay_endpoint": "tcp://*:0"}


def _sha256(value: Any) -> bytes:
    """vLLM's `sha256` (vllm/utils/hashing.py): SHA-256 of the highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def block_hashes(tokens: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                 cache_salt: str | None = None) -> tuple[int, ...]:
    """The engine's hashes of a prompt's full blocks (vLLM's hash_block_tokens, chained from NONE_HASH =
    sha256(seed); the first block's extra keys hold the cache salt), as the events' 64-bit ints."""
    parent, out = _sha256(seed), []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra = (("cache_salt", cache_salt),) if start == 0 and cache_salt else None
        parent = _sha256((parent, tuple(tokens[start:start + block_size]), extra))
        out.append(int.from_bytes(parent, "big") & MASK64)
    return tuple(out)


class PromptTokens:
    """A request's prompt token ids as the engine makes them, for text-only chat and completions: the model's
    own tokenizer and chat template, the calls vLLM's renderer makes (chat: the template rendered with the
    generation prompt, then encoded without special tokens; completions: encoded with them). None for
    anything else (tools, images, a template of the request's own, ...) and until the tokenizer has loaded
    (in a thread: transformers' import and the tokenizer take seconds)."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer: Any = None
        threading.Thread(target=self._load, args=(model_dir,), name="raylm-kv-tokenizer", daemon=True).start()

    def _load(self, model_dir: str) -> None:
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # routing by the engine's cache then falls back to the text's
            logger.warning("kv routing: the tokenizer in %s did not load (%r); routing by prompt text", model_dir, exc)

    def __call__(self, endpoint: str, body: dict) -> list[int] | None:
        tokenizer = self.tokenizer
        if tokenizer is None or any(key in body for key in ("tools", "chat_template", "chat_template_kwargs",
                                                               "continue_final_message", "add_generation_prompt")):
            return None
        if endpoint == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
            return tokenizer.encode(prompt) if isinstance(prompt, str) else None
        if endpoint != "chat" or not isinstance(body.get("messages"), list):
            return None
        turns = []
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # text parts only, joined as vLLM joins them for a string template
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    return None
                content = "\n".join(p.get("text", "") for p in content)
            if not isinstance(content, str) or set(message) - {"role", "content", "name"}:
                return None
            turns.append({"role": message.get("role"), "content": content})
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)


class EngineIndex:
    """Per replica, the block hashes its engine reported stored and not removed; plus, for EXPECT_S, those of
    the requests routed to it. The interface routing.prefer reads (matched, blocks), as PrefixIndex."""

    def __init__(self, expect_s: float = EXPECT_S, clock=time.monotonic) -> None:
        self.expect_s, self.clock = expect_s, clock
        self._held: dict[Hashable, set[int]] = {}
        # per replica, block hash → until when, oldest first (one TTL for all: insertion order is expiry order)
        self._expected: dict[Hashable, OrderedDict[int, float]] = {}
        self.block_size: dict[Hashable, int] = {}
        self._lock = threading.Lock()  # the subscriber thread writes, the router's event loop reads

    def apply(self, replica: Hashable, events: Iterable[Any]) -> None:
        """One batch of a replica's decoded events (msgpack maps tagged by "type")."""
        with self._lock:
            held = self._held.setdefault(replica, set())
            for event in events:
                if not isinstance(event, dict):
                    continue
                kind = event.get("type")
                if event.get("medium") not in (None, "GPU") or event.get("group_idx") not in (None, 0):
                    continue  # an offloaded tier's copy, or another KV cache group: not the prefix cache asked
                if kind == "BlockStored":
                    held.update(event.get("block_hashes") or ())
                    if event.get("block_size"):
                        self.block_size[replica] = int(event["block_size"])
                elif kind == "BlockRemoved":
                    held.difference_update(event.get("block_hashes") or ())
                elif kind == "AllBlocksCleared":
                    held.clear()

    def clear(self, replica: Hashable) -> None:
        with self._lock:
            self._held.pop(replica, None)

    def expect(self, replica: Hashable, chain: Sequence[int]) -> None:
        until = self.clock() + self.expect_s
        with self._lock:
            expected = self._expected.setdefault(replica, OrderedDict())
            for h in chain:
                expected[h] = until
                expected.move_to_end(h)
            while expected and next(iter(expected.values())) <= until - self.expect_s:
                expected.popitem(last=False)  # run out: dropped as new ones come, so it stays bounded

    def matched(self, replica: Hashable, chain: Sequence[int]) -> int:
        """How many leading blocks of `chain` the replica holds (or was just sent)."""
        now = self.clock()
        with self._lock:
            held = self._held.get(replica, set())
            expected = self._expected.get(replica, {})
            n = 0
            while n < len(chain) and (chain[n] in held or expected.get(chain[n], 0.0) > now):
                n += 1
            return n

    def blocks(self, replica: Hashable) -> int:
        with self._lock:
            return len(self._held.get(replica, ()))

    def keep(self, replicas: Iterable[Hashable]) -> None:
        alive = set(replicas)
        with self._lock:
            for table in (self._held, self._expected, self.block_size):
                for replica in [r for r in table if r not in alive]:
                    del table[replica]


def publish(model: str, replica: str, endpoints: tuple[str, str | None], seed: str, algo: str,
            model_dir: str) -> None:
    """A replica says where its engine's events are (published, replayed), how its engine hashes blocks, and
    where its tokenizer is (Ray's internal KV: read by every ingress process)."""
    record = {"endpoint": endpoints[0], "replay_endpoint": endpoints[1], "seed": seed, "algo": algo,
              "model_dir": model_dir}
    _ray.kv_put(f"{KEY_PREFIX}{model}/{replica}", json.dumps(record))


def unpublish(model: str, replica: str) -> None:
    _ray.kv_del(f"{KEY_PREFIX}{model}/{replica}")


def published(model: str) -> dict[str, dict[str, str]]:
    """replica unique id → {endpoint, seed, algo}, for every replica of `model` that published."""
    out = {}
    prefix = f"{KEY_PREFIX}{model}/"
    for key in _ray.kv_list(prefix):
        raw = _ray.kv_get(key)
        if raw:
            name = key.decode() if isinstance(key, bytes) else key
            out[name[len(prefix):]] = json.loads(raw)
    return out


class Subscriber:
    """A daemon thread that keeps, per replica of a model, a ZMQ SUB socket on its engine's events and feeds an
    EngineIndex. On subscribing, and on a gap in a publisher's sequence (events dropped), it asks the
    engine's replay socket for what it missed (vLLM keeps the last 10,000 steps' batches), so a late ingress
    starts from what the engine holds, not from nothing. It also loads the model's tokenizer (PromptTokens)
    from the folder the first replica published, before any request needs it.

    `replicas()` gives the deployment's current replicas ({unique id: key in the index}); each that published
    is subscribed to, each gone is dropped (and forgotten by the index)."""

    REPLAY_TIMEOUT_S = 5.0

    def __init__(self, model: str, index: EngineIndex, replicas) -> None:
        self.model, self.index, self.replicas = model, index, replicas
        self.seeds: dict[Hashable, tuple[str, str]] = {}  # replica → (hash seed, algo) it published
        self.tokens: PromptTokens | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"raylm-kv-events-{model}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import msgspec
        import zmq

        self._zmq, self._decode = zmq, msgspec.msgpack.Decoder().decode
        ctx = zmq.Context.instance()
        self._poller = zmq.Poller()
        self._subs: dict[Hashable, tuple[Any, dict]] = {}  # replica → (SUB socket, its published record)
        self._last: dict[Hashable, int] = {}  # replica → the last sequence number applied
        next_discovery = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_discovery:
                    next_discovery = time.monotonic() + DISCOVER_S
                    self._discover(ctx)
                if not self._subs:
                    self._stop.wait(0.2)
                    continue
                by_socket = {sock: key for key, (sock, _) in self._subs.items()}
                for sock, _ in self._poller.poll(timeout=200):
                    key = by_socket[sock]
                    for _ in range(1000):  # bounded per socket per round
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._take(ctx, key, frames)
        finally:
            for sock, _ in self._subs.values():
                sock.close(linger=0)

    def _discover(self, ctx: Any) -> None:
        try:
            wanted = self.replicas()
            records = published(self.model) if wanted else {}
        except Exception as exc:  # GCS busy or restarting: try again next round
            logger.debug("kv events: discovery of %s failed: %r", self.model, exc)
            return
        for key in [k for k in self._subs if k not in wanted.values()]:
            self._drop(key)
        for unique_id, key in wanted.items():
            record = records.get(unique_id)
            if record is None or (key in self._subs and self._subs[key][1] == record):
                continue
            self._drop(key)
            sock = ctx.socket(self._zmq.SUB)
            sock.setsockopt(self._zmq.SUBSCRIBE, b"")
            sock.connect(record["endpoint"])
            self._subs[key] = (sock, record)
            self._poller.register(sock, self._zmq.POLLIN)
            self.seeds[key] = (record.get("seed", DEFAULT_SEED), record.get("algo", "sha256"))
            if self.tokens is None and record.get("model_dir"):
                self.tokens = PromptTokens(record["model_dir"])
            self.index.clear(key)
            self._replay(ctx, key, 0)  # what it holds already (the SUB socket buffers what comes meanwhile)

    def _drop(self, key: Hashable) -> None:
        if key in self._subs:
            sock, _ = self._subs.pop(key)
            self._poller.unregister(sock)
            sock.close(linger=0)
        self._last.pop(key, None)
        self.seeds.pop(key, None)

    def _take(self, ctx: Any, key: Hashable, frames: list[bytes]) -> None:
        """One published batch: applied in sequence; a gap is filled from the replay socket first."""
        if len(frames) != 3:
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        last = self._last.get(key)
        if last is not None and seq <= last:
            return  # replayed already
        if last is not None and seq > last + 1 and not self._replay(ctx, key, last + 1, until=seq):
            self.index.clear(key)  # the engine no longer has what was dropped: start over from here
        self._apply(key, seq, frames[2])

    def _apply(self, key: Hashable, seq: int, payload: bytes) -> None:
        self._last[key] = seq
        try:
            batch = self._decode(payload)
            self.index.apply(key, batch[1] if isinstance(batch, list) and len(batch) > 1 else ())
        except Exception as exc:  # a malformed batch costs its events, never the thread
            logger.debug("kv events: a batch from %s unreadable: %r", key, exc)

    def _replay(self, ctx: Any, key: Hashable, start: int, until: int | None = None) -> bool:
        """Apply the engine's buffered batches from `start` (to before `until`); False if it could not give
        them all (no replay socket, no answer in time, or the first ones no longer buffered)."""
        endpoint = self._subs[key][1].get("replay_endpoint")
        if not endpoint:
            return False
        zmq = self._zmq
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + self.REPLAY_TIMEOUT_S
            first = None
            while time.monotonic() < deadline:
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                if len(frames) != 4:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq < 0:  # the end of the replay
                    return first is None or first == start
                first = seq if first is None else first
                if until is None or seq < until:
                    self._apply(key, seq, frames[3])
            return False
        finally:
            sock.close()
