"""Routing by the engines' KV cache events (`routing: kv`): block hashes equal to vLLM's own, the index the
events build (stored, evicted, cleared), and the router choosing by it (no cluster: fake replicas)."""

import asyncio
import types

from ray.serve.request_router import PendingRequest

from raylm import _ray
from raylm.config import ModelConfig
from raylm.contract import Call
from raylm.serve.control.builder import ROUTERS, serve_options
from raylm.serve.edge import kv_events
from raylm.serve.edge.routing import KVEventRouter
from test_routing import DeploymentID, FakeReplica


def test_block_hashes_are_vllms_own_chained_from_its_seed_with_the_salt_in_the_first_block():
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as vllm_kv

    vllm_kv.init_none_hash(sha256)
    seed = vllm_kv.resolve_none_hash_seed(sha256)  # "vllm-none-hash" unless PYTHONHASHSEED is set
    tokens = list(range(1000, 1000 + 70))  # 4 full blocks of 16, and 6 tokens that make no block

    def vllm_chain(salt):
        parent, out = None, []
        for i in range(4):
            extra = (("cache_salt", salt),) if salt and i == 0 else None
            parent = vllm_kv.hash_block_tokens(sha256, parent, tokens[16 * i:16 * (i + 1)], extra)
            out.append(vllm_kv.maybe_convert_block_hash(parent))
        return tuple(out)

    assert kv_events.block_hashes(tokens, 16, seed) == vllm_chain(None)
    assert kv_events.block_hashes(tokens, 16, seed, cache_salt="t1") == vllm_chain("t1")
    assert kv_events.block_hashes(tokens, 16, seed, cache_salt="t1")[0] != vllm_chain(None)[0]
    assert kv_events.block_hashes(tokens[:15], 16, seed) == ()


def stored(*hashes, medium="GPU"):
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": None, "token_ids": [],
            "block_size": 16, "medium": medium}


def test_the_index_holds_what_was_stored_and_forgets_what_was_evicted_or_cleared():
    now = [0.0]
    index = kv_events.EngineIndex(expect_s=5.0, clock=lambda: now[0])
    index.apply("a", [stored(1, 2, 3), stored(9, medium="CPU"), {"type": "BlockRemoved", "block_hashes": [2]}])
    assert (index.matched("a", (1, 2, 3)), index.matched("a", (1, 3)), index.blocks("a")) == (1, 2, 2)
    assert index.matched("a", (9,)) == 0 and index.block_size["a"] == 16  # an offloaded tier's block: not held
    index.apply("a", [{"type": "AllBlocksCleared"}])
    assert index.blocks("a") == 0
    index.expect("b", (4, 5))  # routed there: held until its events can have said so
    assert index.matched("b", (4, 5, 6)) == 2
    now[0] = 6.0
    assert index.matched("b", (4, 5)) == 0
    index.apply("c", [stored(7)])
    index.keep(["a"])
    assert index.blocks("c") == 0 and "c" not in index.block_size


def test_the_kv_router_sends_a_prompt_to_the_engine_holding_its_blocks_and_spreads_once_evicted():
    prompt = list(range(64))  # 4 blocks of 16
    chain = kv_events.block_hashes(prompt, 16)

    def request(rid: str) -> PendingRequest:
        return PendingRequest(args=[Call("completions", {"model": "m", "prompt": prompt}, rid)], kwargs={},
                              metadata=_ray.load("RequestMetadata")(request_id=rid, internal_request_id=rid))

    async def main() -> list:
        router = KVEventRouter(DeploymentID(name="model-m", app_name="raylm"),
                               _ray.load("DeploymentHandleSource").UNKNOWN, use_replica_queue_len_cache=True)
        router.initialize_state(model_name="")  # no subscriber thread: the test feeds the index itself
        router.subscriber = types.SimpleNamespace(seeds={"a": (kv_events.DEFAULT_SEED, "sha256")},
                                                  tokens=lambda endpoint, body: body["prompt"])
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        router.engines.apply(a.replica_id, [stored(*chain[:3], *range(100, 150))])  # the first 3, 50 others
        router.engines.apply(b.replica_id, [stored(*range(200, 210))])  # b: 10 other blocks
        holder = (await router.choose_replicas([a, b], request("1")))[0][0].replica_id.unique_id
        router.engines.apply(a.replica_id, [{"type": "BlockRemoved", "block_hashes": list(chain[:3])}])
        evicted = (await router.choose_replicas([a, b], request("2")))[0][0].replica_id.unique_id
        return [holder, evicted]

    # held: a, though it holds more blocks than b; evicted: nobody holds it, so the replica holding fewest
    assert asyncio.run(main()) == ["a", "b"]


def test_kv_routing_is_asked_by_name_and_its_router_told_the_model():
    options = serve_options(ModelConfig(name="m", source="/m", replicas=2, routing="kv"))
    assert options["request_router_config"] == {"request_router_class": ROUTERS["kv"],
                                                 "request_router_kwargs": {"model_name": "m"}}
