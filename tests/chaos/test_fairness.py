"""A flooding tenant cannot starve a light one, and backlogged tenants share the engine by weight.

Not in `make test` (about 5 min): run with `make test-slow`. Bounded in requests and seconds, loopback only.
"""

import asyncio
import time
from statistics import fmean

import pytest

from helpers import ClientPauses, Steal
from scenario import LIMITS, load, report, sender

from raylm.bench.load import LoadResult, closed_loop, open_loop, percentile

BLOCK_S = 20.0  # 4 blocks of each condition: 80 s of light traffic alone, 80 s flooded
HEAD_S = 3.0  # the flood's head start in its blocks
ORDER = ("alone", "flood", "flood", "alone", "alone", "flood", "flood", "alone")


@pytest.mark.slow
def test_a_flooding_tenant_cannot_starve_a_light_one(fair_service):
    # Each tenant keeps half of all the slots and queue places busy: the queue is never empty, never over.
    BACKLOG = (LIMITS["max_running"] + LIMITS["burst"] + LIMITS["max_queued"]) // 2
    HEAVY_TOKENS = 192
    url = fair_service.url

    # The light tenant is interactive (short streamed answers); the flooder is a batch client (long answers,
    # no streaming), so the engine, not the HTTP plumbing, is what it saturates. With 64-token floods at
    # 16 requests/s, the Serve hops and 429s of the flood took enough of the 2 cores to show in the light
    # tenant's tail (p99 ratios 2.2-4.6), and 300 SSE chunks a second would starve the test's own client.
    def flooder(client, u):
        return sender(client, u, "tiny", "heavy", max_tokens=HEAVY_TOKENS, stream=False)

    def light(client, u, block):  # the same Poisson arrivals (seed) alone and under the flood
        return open_loop(sender(client, u, "tiny", "light", max_tokens=16), light_rate, BLOCK_S, seed=block)

    async def capacity(client, u):  # for 30 s, so that the first requests' warm-up and the last ones' drain
        return await closed_loop(flooder(client, u), LIMITS["max_running"], 10_000, 30)  # weigh little

    steal = Steal()
    cap = asyncio.run(load(url, capacity))
    steal_capacity = steal.share()
    cap_rps = len(cap.ok) / cap.wall_s
    # The flooder alone offers 8/7 of capacity: the service is saturated, the queue fills and the flooder is
    # refused; the refusals' own cost on the 2 cores is part of what the light tenant must not feel (they are
    # refused before they are counted: Admission.refuse_early). The capacity is a 30 s closed loop: from 16
    # requests (the first ones' warm-up, the last ones' drain) it came out ~40% low, and "8/7" was 0.75×.
    light_rate = cap_rps / 7

    async def flood(client, u, block):
        # The flood starts with the queue full (every slot and queue place taken) HEAD_S before the light
        # tenant's traffic, which so meets a long flood's steady state, neither its onset (16 requests at
        # once) nor a queue still filling at 1/7 of capacity.
        fill = asyncio.gather(*(flooder(client, u)(i) for i in range(2 * BACKLOG)))
        arrivals = open_loop(flooder(client, u), 8 * light_rate, HEAD_S + BLOCK_S, seed=100 + block)

        async def late_light():
            await asyncio.sleep(HEAD_S)
            return await light(client, u, block)

        lit, filled, heavy = await asyncio.gather(late_light(), fill, arrivals)
        return lit, LoadResult(0, heavy.wall_s, tuple(filled) + heavy.results)

    # Alone (the unloaded value: the light tenant's own traffic with nobody else; a closed loop of
    # back-to-back requests would measure a hotter engine than it ever sees) and flooded, in blocks ordered
    # A F F A A F F A: this VM's CPU steal drifts over minutes (1% in one phase, 25% in the next: a 60 s
    # flood measured after a 60 s quiet phase failed at 2.44 and 3.30 while the same code gave 0.57-1.66),
    # and ABBA blocks give both conditions the same share of any drift. Steal is reported per condition.
    async def blocks(client, u):
        runs = {"alone": [], "flood": [], "heavy": []}
        steals = {"alone": [], "flood": []}
        for i, kind in enumerate(ORDER):
            starts.append(time.perf_counter())
            block = ORDER[:i].count(kind)  # the k-th alone block and the k-th flood block: the same arrivals
            if kind == "alone":
                runs["alone"].append(await light(client, u, block))
            else:
                lit, hv = await flood(client, u, block)
                runs["flood"].append(lit)
                runs["heavy"].append(hv)
            steals[kind].append(steal.share())
        return runs, steals

    starts, pauses = [], ClientPauses()
    runs, steals = asyncio.run(load(url, blocks))
    pauses.close()
    alone, flooded, heavy = _merged(runs["alone"]), _merged(runs["flood"]), _merged(runs["heavy"])
    if hasattr(fair_service, "receiver"):
        _slowest_first_tokens(fair_service.receiver, "light")
    base = [r.ttft_s for r in alone.ok]
    light_ttft = [r.ttft_s for r in flooded.ok]
    ratio = percentile(light_ttft, 0.99) / percentile(base, 0.99)
    for name, results in (("alone", alone), ("flooded", flooded)):  # when in its block each tail request came
        slowest = sorted(results.ok, key=lambda r: r.ttft_s)[-3:]
        print(f"\nslowest light first tokens {name}: " + ", ".join(
            f"{r.ttft_s * 1e3:.0f} ms at {r.started_s - max(t for t in starts if t <= r.started_s):.1f} s"
            for r in slowest))

    async def backlog(client, u):  # both tenants always waiting: completions follow the weights 2:1
        return await asyncio.gather(
            closed_loop(sender(client, u, "tiny", "gold", stream=False), BACKLOG, 10_000, 30),
            closed_loop(sender(client, u, "tiny", "free", stream=False), BACKLOG, 10_000, 30))

    gold, free = asyncio.run(load(url, backlog))
    share = len(gold.ok) / (len(gold.ok) + len(free.ok))
    report("fairness", light_rps=light_rate, heavy_rps=8 * light_rate, capacity_rps=cap_rps,
           light_ok=len(flooded.ok),
           light_refused=len(flooded.results) - len(flooded.ok), heavy_ok=len(heavy.ok),
           heavy_refused=len(heavy.results) - len(heavy.ok), light_ttft_p50_alone=percentile(base, 0.5),
           light_ttft_p99_alone=percentile(base, 0.99), light_ttft_p50_flooded=percentile(light_ttft, 0.5),
           light_ttft_p99_flooded=percentile(light_ttft, 0.99), p99_ratio=ratio, gold_share=share,
           gold_weight_share=2 / 3, cpu_steal_capacity=steal_capacity,
           cpu_steal_alone=fmean(steals["alone"]), cpu_steal_flood=fmean(steals["flood"]),
           client_gc_full=len(pauses.ms[2]), client_gc_max_ms=pauses.longest_ms)
    assert alone.errors == 0
    assert len(flooded.ok) == len(flooded.results)  # the light tenant is never refused
    assert len(heavy.results) > len(heavy.ok)  # while the flooder is
    assert ratio <= 2.0  # without fair order it waited behind the flood's queue: ratio > 40 measured
    assert abs(share - 2 / 3) <= 0.1


def _merged(runs: list[LoadResult]) -> LoadResult:
    return LoadResult(0, sum(r.wall_s for r in runs), tuple(x for r in runs for x in r.results))


def _slowest_first_tokens(receiver, tenant: str, most: int = 5) -> None:
    """Each phase of the tenant's slowest requests to their first token, from their traces."""
    time.sleep(2)  # the last spans exported
    spans = receiver.spans()
    roots = [s for s in spans if s.attributes.get("raylm.tenant") == tenant and s.kind == "server"
             and s.service_name == "raylm-ingress"]
    rows = []
    for root in roots:
        trace = {s.name: s for s in spans if s.trace_id == root.trace_id}
        if "prefill" in trace:
            phases = {n: trace[n].duration_ms for n in ("auth", "read body", "route", "prepare", "admission wait",
                                                        "prefill") if n in trace}
            rows.append(((trace["prefill"].end_ns - root.start_ns) / 1e6, phases))
    print(f"\nFIRST TOKENS of {tenant}: {len(rows)} traced; slowest:")
    for first_ms, phases in sorted(rows, key=lambda r: r[0])[-most:]:
        print(f"  {first_ms:6.1f} ms  " + "  ".join(f"{n} {ms:.1f}" for n, ms in phases.items()))
