"""Prefix-aware routing: prompt text of each body shape, chained block hashes, the bounded LRU, the choice,
and the Serve router around them (constructed without a cluster, on fake replicas)."""

import asyncio

import pytest
from ray.serve.request_router import PendingRequest, ReplicaID

from raylm import _ray
from raylm.config import ModelConfig
from raylm.contract import Call
from raylm.serve.control.builder import ROUTERS, serve_options
from raylm.serve.edge.routing import (Pending, PrefixAffinityRouter, PrefixIndex, SpreadRouter, block_chain, prefer,
                                      prompt_text)

SYSTEM = "You answer questions about the solar system. " * 30  # ~1,400 chars: 5 blocks of 256


def chat(question: str, system: str = SYSTEM) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def test_chat_text_is_each_turn_in_order_with_only_text_parts():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": "data:xyz"}}]}]}
    assert prompt_text(body) == "\x1esystem\x1fBe brief.\x1euser\x1fWhat is this?"


def test_responses_anthropic_and_completions_bodies():
    responses = {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}, {"type": "function_call", "name": "f"}]}
    assert prompt_text(responses) == "Be brief.\x1euser\x1fHi"
    assert prompt_text({"input": "Hi"}) == "Hi"
    anthropic = {"system": [{"type": "text", "text": "Be brief."}], "messages": [{"role": "user", "content": "Hi"}]}
    assert prompt_text(anthropic) == "Be brief.\x1euser\x1fHi"
    assert prompt_text({"prompt": "Once upon"}) == "Once upon"
    assert prompt_text({"prompt": [1, 2, 3]}) == prompt_text({"prompt": [[1, 2, 3]]}) == "1,2,3,"


def test_text_is_bounded_and_odd_shapes_give_nothing_rather_than_an_error():
    assert prompt_text({"prompt": "x" * 10_000}, max_chars=300) == "x" * 300
    assert prompt_text({"prompt": [7] * 10_000}, max_chars=10) == "7,7,7,7,7,"
    odd = {"messages": [None, 3.5, {"content": {"a": 1}}, {"role": "user", "content": [[{"text": "deep"}]]}]}
    assert [prompt_text(body) for body in (None, "text", [1, 2], {}, {"prompt": True}, {"messages": "hi"}, odd)] \
        == ["", "", "", "", "", "hi", "\x1e\x1f\x1euser\x1f"]


def test_block_hashes_are_chained_over_full_blocks_only():
    a, b = prompt_text(chat("What is the largest planet? " * 20)), prompt_text(chat("How far is Mars? " * 20))
    chain_a, chain_b = block_chain(a, 256), block_chain(b, 256)
    assert len(chain_a) == len(a) // 256  # the partial last block is not hashed, as vLLM's
    shared = next(i for i in range(len(a)) if a[i] != b[i]) // 256
    assert chain_a[:shared] == chain_b[:shared] and chain_a[shared] != chain_b[shared]
    edited = block_chain("y" + a[1:], 256)  # one change in the first block changes every hash after it
    assert not set(edited) & set(chain_a)
    assert not set(block_chain(a, 256, seed="completions")) & set(chain_a)


def test_the_lru_is_bounded_and_forgets_a_prefix_from_its_tail():
    index = PrefixIndex(capacity_blocks=4)
    index.record("r1", (1, 2, 3))
    index.record("r1", (9, 8))  # 5 blocks held: the oldest goes, the first chain's tail
    assert (index.blocks("r1"), index.matched("r1", (1, 2, 3)), index.matched("r1", (9, 8, 7))) == (4, 2, 2)
    index.record("r2", (1,))
    index.keep(["r2"])
    assert (index.blocks("r1"), index.matched("r2", (1, 2))) == (0, 1)


def test_the_longest_holder_wins_unless_it_is_overloaded():
    index = PrefixIndex()
    index.record("a", (1, 2, 3))
    index.record("b", (1,))
    chain, idle = (1, 2, 3, 4), {"a": 0, "b": 0, "c": 0}
    assert prefer(chain, ["c", "b", "a"], idle, index) == "a"
    assert prefer(chain, ["c", "b", "a"], {"a": 9, "b": 2, "c": 0}, index, imbalance=8) == "b"  # a: 9 > 0 + 8
    assert prefer(chain, ["c", "b", "a"], {"a": 9, "b": 9, "c": 0}, index, imbalance=8) == "c"  # holders busy
    # A new prefix goes to the replica holding the fewest blocks (a: 3, b: 1, c: 0); no full block: pow-2.
    assert prefer((7, 8), ["a", "b", "c"], idle, index) == "c" and prefer((7, 8), ["a", "b"], idle, index) == "b"
    assert prefer((), ["a"], idle, index) is None
    index.record("b", (1, 2, 3))
    assert prefer(chain, ["a", "b"], {"a": 3, "b": 1}, index) == "b"  # equal matches: the shorter queue


DeploymentID = _ray.load("DeploymentID")


class FakeReplica:
    """What Serve's router reads of a replica."""

    def __init__(self, name: str) -> None:
        self.replica_id = ReplicaID(name, DeploymentID(name="model-m", app_name="raylm"))
        self.max_ongoing_requests = 100
        self.node_id, self.availability_zone, self.multiplexed_model_ids = "node", None, set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def test_the_router_sends_a_shared_prefix_where_it_went_before():
    def request(question: str) -> PendingRequest:
        return PendingRequest(args=[Call("chat", chat(question), "rid")], kwargs={},
                              metadata=_ray.load("RequestMetadata")(request_id="rid", internal_request_id=question))

    async def main() -> list:
        router = PrefixAffinityRouter(DeploymentID(name="model-m", app_name="raylm"),
                                      _ray.load("DeploymentHandleSource").UNKNOWN, use_replica_queue_len_cache=True)
        router.initialize_state(imbalance=2)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        first = request("What is the largest planet?")
        unknown = await router.choose_replicas([a, b], first)
        router.on_request_routed(first, b.replica_id, None)
        second = request("How far is Mars?")
        affine = await router.choose_replicas([a, b], second)
        for _ in range(4):
            router.on_send_request(b.replica_id)  # b: 4 ongoing; a: 1 at most (the first choice, never sent)
        busy = await router.choose_replicas([a, b], second)
        router.update_replicas([a])
        return [len(unknown[0]), affine, busy, first.routing_context.should_backoff, router.index.blocks(b.replica_id)]

    sizes, affine, busy, backoff, left = asyncio.run(main())
    assert sizes == 1 and backoff  # no match: the replica holding least (both nothing); Serve backs off
    assert [[r.replica_id.unique_id for r in rank] for rank in affine] == [["b"], ["a"]]
    assert [[r.replica_id.unique_id for r in rank] for rank in busy] == [["a"], ["b"]]  # b too busy
    assert left == 0  # a replica that left is forgotten


@pytest.mark.parametrize("router_class", [SpreadRouter, PrefixAffinityRouter])
def test_a_burst_is_spread_before_serve_has_sent_any_of_it(router_class):
    # Serve's routing task chooses for every waiting request in a row and sends (counting each in its queue
    # length cache) only after: without the choices not yet sent, all saw the same queues.
    async def main() -> tuple[list[str], int]:
        router = router_class(deployment_id=DeploymentID(name="model-m", app_name="raylm"),  # by name, as Serve
                              handle_source=_ray.load("DeploymentHandleSource").UNKNOWN,
                              use_replica_queue_len_cache=True)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        chosen = [(await router.choose_replicas([a, b]))[0][0].replica_id for _ in range(10)]
        for replica_id in chosen:
            router.on_send_request(replica_id)  # Serve's cache counts them now; none is pending any more
        return [r.unique_id for r in chosen], router.pending.count(a.replica_id) + router.pending.count(b.replica_id)

    chosen, pending = asyncio.run(main())
    assert (chosen.count("a"), chosen.count("b"), pending) == (5, 5, 0)


@pytest.mark.parametrize("router_class", [SpreadRouter, PrefixAffinityRouter])
def test_a_resumed_stream_avoids_the_replica_that_cut_it_unless_it_is_the_only_one(router_class):
    # Serve's router learns of a killed replica after its streams are seen cut: the resume must go elsewhere.
    def request(avoid: str) -> PendingRequest:
        return PendingRequest(args=[Call("chat", chat("Go on"), "rid", avoid=avoid)], kwargs={},
                              metadata=_ray.load("RequestMetadata")(request_id="rid", internal_request_id="rid"))

    async def main() -> tuple[dict[str, set[str]], set[str], str]:
        router = router_class(deployment_id=DeploymentID(name="model-m", app_name="raylm"),
                              handle_source=_ray.load("DeploymentHandleSource").UNKNOWN,
                              use_replica_queue_len_cache=True)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        picks = {avoid: {(await router.choose_replicas([a, b], request(avoid)))[0][0].replica_id.unique_id
                         for _ in range(8)} for avoid in ("a", "b")}
        plain = {(await router.choose_replicas([a, b], request("")))[0][0].replica_id.unique_id for _ in range(16)}
        only = (await router.choose_replicas([a], request("a")))[0][0].replica_id.unique_id
        return picks, plain, only

    picks, plain, only = asyncio.run(main())
    assert picks == {"a": {"b"}, "b": {"a"}} and plain == {"a", "b"} and only == "a"


def test_a_choice_is_pending_until_sent_or_stale():
    now = [0.0]
    pending = Pending(ttl_s=2.0, clock=lambda: now[0])
    pending.chosen("a"), pending.chosen("a"), pending.chosen("b"), pending.sent("a"), pending.sent("c")
    assert (pending.count("a"), pending.count("b"), pending.count("c")) == (1, 1, 0)
    now[0] = 2.5  # Serve never sent them (the replica was full, the request cancelled): forgotten
    pending.keep(["a"])
    assert (pending.count("a"), pending.count("b")) == (0, 0)


def test_every_model_routes_with_raylms_router_and_prefix_only_when_asked():
    prefix = serve_options(ModelConfig(name="m", source="/m", replicas=2, routing="prefix"))
    assert prefix["request_router_config"] == {"request_router_class": ROUTERS["prefix"]}
    default = serve_options(ModelConfig(name="m", source="/m", replicas=2))
    assert default["request_router_config"] == {"request_router_class": "raylm.serve.edge.routing:SpreadRouter"}


def test_each_tenant_gets_its_own_prefix_cache_and_routing_chain():
    from raylm.serve.edge.ingress import CacheSalt

    salt = CacheSalt(b"secret")
    a, b = salt.of("team-a", None), salt.of("team-b", None)
    assert a != b and len(a) == 32 and salt.of("team-a", "mine") == f"{a}/mine"
    assert CacheSalt(b"other secret").of("team-a", None) != a  # nobody can compute another tenant's salt

    def chain(body):
        async def make():  # a PendingRequest makes a future: it needs a running loop
            router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
            router.initialize_state()
            return router.chain(PendingRequest(args=[Call("chat", body, "rid")], kwargs={}, metadata=None))
        return asyncio.run(make())

    assert chain({**chat("q"), "cache_salt": a}) != chain({**chat("q"), "cache_salt": b})
    assert chain({**chat("q"), "cache_salt": a}) == chain({**chat("q2"), "cache_salt": a})[:5]


def test_an_adapter_goes_where_it_is_loaded_until_that_replica_is_busy_then_spreads():
    from raylm.contract import Adapter

    def request(adapter: str | None, n: int) -> PendingRequest:
        call = Call("completions", {"prompt": "hi"}, "rid", adapter=Adapter(adapter, "/a") if adapter else None)
        return PendingRequest(args=[call], kwargs={},
                              metadata=_ray.load("RequestMetadata")(request_id="rid", internal_request_id=str(n)))

    async def main() -> list[str]:
        router = SpreadRouter(deployment_id=DeploymentID(name="model-m", app_name="raylm"),
                              handle_source=_ray.load("DeploymentHandleSource").UNKNOWN,
                              use_replica_queue_len_cache=True)
        router.initialize_state(adapter_capacity=2)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        picks = []
        for n in range(20):
            req = request("sql", n)
            pick = (await router.choose_replicas([a, b], req))[0][0].replica_id
            router.on_request_routed(req, pick, None)
            router.on_send_request(pick)  # never finishes: queues only grow
            picks.append(pick.unique_id)
        return picks

    picks = asyncio.run(main())
    first = picks[0]
    # The first ADAPTER_IMBALANCE + 1 go where the adapter went first; past that its queue is too long and
    # the other replica takes it (and holds it from then on): a hot adapter ends on both, balanced.
    assert picks[:3] == [first] * 3 and picks[3] != first
    assert abs(picks.count("a") - picks.count("b")) <= 2


def test_the_adapter_index_keeps_as_many_adapters_as_a_replica_holds():
    index = PrefixIndex(2)
    for name in ("x", "y", "z"):
        index.record("r", (hash(("adapter", name)),))
    assert [index.matched("r", (hash(("adapter", n)),)) for n in ("x", "y", "z")] == [0, 1, 1]


def test_a_model_with_adapters_tells_its_router_how_many_a_replica_holds(tmp_path):
    from helpers import make_lora, make_tiny_llama

    lora = make_lora(make_tiny_llama(tmp_path / "tiny"), tmp_path / "a", seed=0)
    model = ModelConfig(name="m", source=str(tmp_path / "tiny"), adapters={"a": str(lora)},
                        lora={"max_loras": 2, "max_cpu_loras": 3})
    assert serve_options(model)["request_router_config"]["request_router_kwargs"] == {"adapter_capacity": 3}


def test_an_adapter_no_replica_holds_has_the_same_home_in_every_ingress_and_adapters_split():
    from raylm.contract import Adapter

    async def homes() -> list[str]:
        router = SpreadRouter(deployment_id=DeploymentID(name="model-m", app_name="raylm"),
                              handle_source=_ray.load("DeploymentHandleSource").UNKNOWN,
                              use_replica_queue_len_cache=True)
        router.initialize_state(adapter_capacity=2)
        replicas = [FakeReplica(r) for r in "abc"]
        router.update_replicas(replicas)
        picks = []
        for n in range(12):  # twelve new adapters, each once: none is held anywhere when it comes
            call = Call("completions", {"prompt": "hi"}, "rid", adapter=Adapter(f"ad{n}", "/a"))
            request = PendingRequest(args=[call], kwargs={}, metadata=_ray.load("RequestMetadata")(
                request_id="rid", internal_request_id=str(n)))
            picks.append((await router.choose_replicas(replicas, request))[0][0].replica_id.unique_id)
        return picks

    first, second = asyncio.run(homes()), asyncio.run(homes())  # two routers: two ingress replicas
    assert first == second and len(set(first)) == 3
