"""Admission on one replica: slots, weighted-fair order, bounded queue, cancellation."""

import asyncio

import pytest

from raylm import errors
from raylm.config import AdmissionConfig
from raylm.contract import Tenant
from raylm.serve.replica.admission import Admission

HEAVY, LIGHT = Tenant("heavy"), Tenant("light")


async def _run(admission, tenant, order, hold, tokens=1, sequences=1):
    async with admission.slot(tenant, tokens, sequences):
        order.append(tenant.name)
        await hold.wait()


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_light_tenant_overtakes_a_flooding_one():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=16, burst=0)), [], asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, HEAVY, order, hold)) for _ in range(6)]
        await _settle()
        tasks.append(asyncio.create_task(_run(admission, LIGHT, order, hold)))
        await _settle()
        assert (admission.running, admission.queued) == (1, 6)
        hold.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    assert order.index("light") <= 2  # one heavy ran, at most one more was due before light


def test_weights_set_the_share_of_a_backlog():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=64, burst=0)), [], asyncio.Event()
        gold, free = Tenant("gold", weight=3), Tenant("free")
        tasks = [asyncio.create_task(_run(admission, t, order, hold)) for _ in range(20) for t in (gold, free)]
        await _settle()
        hold.set()
        await asyncio.gather(*tasks)
        return order

    first = asyncio.run(main())[1:21]  # while both are backlogged
    assert 14 <= first.count("gold") <= 16


def test_priority_comes_before_fairness():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=8, burst=0)), [], asyncio.Event()
        batch, chat = Tenant("batch", priority=1), Tenant("chat", priority=0)
        tasks = [asyncio.create_task(_run(admission, batch, order, hold)) for _ in range(4)]
        await _settle()
        tasks += [asyncio.create_task(_run(admission, chat, order, hold)) for _ in range(2)]
        await _settle()
        hold.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == ["batch", "chat", "chat", "batch", "batch", "batch"]


def test_a_full_queue_refuses_the_flooder_not_the_newcomer():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=2, burst=0)), [], asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, HEAVY, order, hold)) for _ in range(3)]
        await _settle()
        overflow = asyncio.create_task(_run(admission, HEAVY, order, hold))
        light = asyncio.create_task(_run(admission, LIGHT, order, hold))
        await _settle()
        assert overflow.done() and isinstance(overflow.exception(), errors.OverloadedError)
        hold.set()
        results = await asyncio.gather(*tasks, light, return_exceptions=True)
        return admission, order, results

    admission, order, results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, errors.OverloadedError)]
    assert len(refused) == 1 and refused[0].status == 429 and refused[0].headers()["Retry-After"] == "1"
    assert order == ["heavy", "light", "heavy"]
    assert admission.rejected["queue_full"] == 2 and (admission.running, admission.queued) == (0, 0)


def test_queued_prompt_tokens_are_bounded():
    async def main():
        admission = Admission(AdmissionConfig(max_running=1, max_queued=10, max_queued_tokens=100, burst=0))
        hold, order = asyncio.Event(), []
        first = asyncio.create_task(_run(admission, HEAVY, order, hold))
        await _settle()
        waiting = asyncio.create_task(_run(admission, HEAVY, order, hold, tokens=80))
        await _settle()
        with pytest.raises(errors.OverloadedError) as refused:
            await _run(admission, HEAVY, order, hold, tokens=30)
        assert refused.value.code == "queue_tokens_full" and admission.queued_tokens == 80
        hold.set()
        await asyncio.gather(first, waiting)
        return admission

    assert asyncio.run(main()).queued_tokens == 0


def test_a_cancelled_waiter_leaves_no_trace():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=4, burst=0)), [], asyncio.Event()
        running = asyncio.create_task(_run(admission, HEAVY, order, hold))
        await _settle()
        waiting = asyncio.create_task(_run(admission, LIGHT, order, hold, tokens=7))
        await _settle()
        waiting.cancel()
        await _settle()
        assert (admission.queued, admission.queued_tokens) == (0, 0)
        hold.set()
        await running
        return admission

    assert asyncio.run(main()).running == 0


def test_a_tenant_below_its_share_starts_at_once_in_a_burst_slot():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=2, max_queued=8, burst=1)), [], asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, HEAVY, order, hold)) for _ in range(4)]
        await _settle()
        assert (admission.running, admission.queued) == (2, 2)  # heavy holds its share and more: no burst
        tasks += [asyncio.create_task(_run(admission, LIGHT, order, hold)) for _ in range(2)]
        await _settle()
        state = (admission.running, admission.queued, dict(admission.running_by))
        hold.set()
        await asyncio.gather(*tasks)
        return state

    running, queued, by_tenant = asyncio.run(main())
    assert (running, queued) == (3, 3)  # the first light request took the one burst slot, the second waits
    assert by_tenant == {"heavy": 2, "light": 1}


def test_a_head_over_its_share_does_not_block_a_tenant_under_it():
    async def main():
        admission, order = Admission(AdmissionConfig(max_running=2, max_queued=8, burst=2)), []
        first, rest = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, t, order, hold))
                 for t, hold in ((HEAVY, rest), (HEAVY, rest), (LIGHT, first), (LIGHT, first))]
        await _settle()  # heavy holds the 2 slots, light both extra slots
        tasks += [asyncio.create_task(_run(admission, t, order, rest)) for t in (HEAVY, LIGHT)]
        await _settle()
        assert (admission.running, admission.queued) == (4, 2)
        first.set()  # light's two finish; heavy heads the queue but already holds its share (2 of 4)
        await _settle()
        after = dict(admission.running_by)
        rest.set()
        await asyncio.gather(*tasks)
        return after

    assert asyncio.run(main()) == {"heavy": 2, "light": 1}


def test_slots_count_sequences():
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=4, max_queued=8, burst=0)), [], asyncio.Event()
        wide = asyncio.create_task(_run(admission, HEAVY, order, hold, sequences=3))
        await _settle()
        second = asyncio.create_task(_run(admission, HEAVY, order, hold, sequences=2))
        one = asyncio.create_task(_run(admission, LIGHT, order, hold))
        await _settle()
        state = (admission.running, admission.queued)
        hold.set()
        await asyncio.gather(wide, second, one)
        huge = Admission(AdmissionConfig(max_running=2, max_queued=8, burst=0))
        alone = asyncio.Event()
        alone.set()
        await _run(huge, HEAVY, [], alone, sequences=5)  # wider than the batch: runs, alone
        return state, admission.running

    (running, queued), after = asyncio.run(main())
    # n=2 does not fit beside n=3 in 4 slots and waits; the light tenant, under its share, takes the free one
    assert (running, queued) == (4, 1)
    assert after == 0


def test_a_request_that_would_wait_too_long_is_refused_at_once_with_that_wait():
    now = [0.0]

    async def main():
        limits = AdmissionConfig(max_running=1, max_queued=64, burst=0, max_queue_wait_s=2.0)
        admission, order, hold = Admission(limits, clock=lambda: now[0]), [], asyncio.Event()
        for _ in range(8):  # the replica finishes one request every 0.5 s: 2 per second
            now[0] += 0.5
            hold.set()
            await _run(admission, HEAVY, order, hold)
        assert admission.finishing_rate() == 2.0
        hold.clear()
        running = asyncio.create_task(_run(admission, HEAVY, order, hold))
        queued = [asyncio.create_task(_run(admission, HEAVY, order, hold)) for _ in range(4)]
        await _settle()  # 4 waiting: the next would wait (4 + 1) / 2 = 2.5 s
        with pytest.raises(errors.OverloadedError) as refused:
            await _run(admission, HEAVY, order, hold)
        light_first = asyncio.create_task(_run(admission, LIGHT, order, hold))  # ahead of heavy's 4: 0.5 s
        await _settle()
        state = (admission.queued, admission.rejected["queue_wait"])
        hold.set()
        await asyncio.gather(running, *queued, light_first)
        now[0] += 60  # a minute idle: the rate is forgotten, so nothing is refused by time
        return refused.value, state, admission.finishing_rate()

    refused, (queued, rejected), rate_after_idle = asyncio.run(main())
    assert refused.status == 429 and refused.code == "queue_wait" and refused.headers()["Retry-After"] == "2"
    assert (queued, rejected) == (5, 1)
    assert rate_after_idle is None


def test_batch_work_is_capped_never_queues_and_never_delays_a_waiter():
    async def main():
        admission = Admission(AdmissionConfig(max_running=3, max_queued=4, burst=0, batch_max_running=2,
                                              batch_quiet_s=0))
        batch, order, hold = Tenant("a", batch=True), [], asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, batch, order, hold)) for _ in range(2)]
        await _settle()
        with pytest.raises(errors.OverloadedError) as capped:  # a third batch sequence: over its cap
            async with admission.slot(batch, 1):
                pass
        assert capped.value.code == "batch_deferred" and admission.queued == 0
        tasks += [asyncio.create_task(_run(admission, LIGHT, order, hold)) for _ in range(2)]
        await _settle()
        assert (admission.running, admission.queued, admission.batch_running) == (3, 1, 2)
        hold.set()
        await asyncio.sleep(0)
        hold.clear()
        # The batch sequences finished; with an interactive request running and none waiting, batch may start.
        await _settle()
        assert admission.batch_running == 0
        tasks.append(asyncio.create_task(_run(admission, batch, order, hold)))
        await _settle()
        assert admission.batch_running == 1
        hold.set()
        await asyncio.gather(*tasks)
        return order, admission.rejected["batch_deferred"]

    order, deferred = asyncio.run(main())
    assert order == ["a", "a", "light", "light", "a"] and deferred == 1


def test_batch_work_waits_while_interactive_requests_run_and_for_a_quiet_spell_after():
    async def main():
        now = [0.0]
        admission = Admission(AdmissionConfig(max_running=4, batch_quiet_s=1.0), clock=lambda: now[0])
        hold, order = asyncio.Event(), []

        async def batch_starts() -> bool:
            try:
                async with admission.slot(Tenant("a", batch=True), 1):
                    return True
            except errors.OverloadedError:
                return False

        first = await batch_starts()  # nothing interactive yet: at once
        chat = asyncio.create_task(_run(admission, LIGHT, order, hold))
        await _settle()
        beside = await batch_starts()  # slots are free, but an interactive request runs
        hold.set()
        await chat
        now[0] += 0.5
        soon_after = await batch_starts()
        now[0] += 0.6
        return first, beside, soon_after, await batch_starts(), admission.rejected["batch_deferred"]

    assert asyncio.run(main()) == (True, False, False, True, 2)


def test_a_request_sure_to_be_refused_is_refused_before_it_is_counted():
    """refuse_early agrees with `slot`: the flooder's next request is refused, the light tenant's is not."""
    async def main():
        admission, order, hold = Admission(AdmissionConfig(max_running=1, max_queued=2, burst=0)), [], asyncio.Event()
        tasks = [asyncio.create_task(_run(admission, HEAVY, order, hold)) for _ in range(3)]
        await _settle()
        with pytest.raises(errors.OverloadedError) as refused:
            admission.refuse_early(HEAVY)
        admission.refuse_early(LIGHT)  # it would take the flooder's last queue place
        bursting = Admission(AdmissionConfig(max_running=1, max_queued=1, burst=1))
        held = [asyncio.create_task(_run(bursting, HEAVY, order, hold)) for _ in range(2)]
        await _settle()
        bursting.refuse_early(Tenant("new", weight=2))  # never seen before: it may take the burst slot
        with pytest.raises(errors.OverloadedError):
            bursting.refuse_early(HEAVY)
        hold.set()
        await asyncio.gather(*held)
        await asyncio.gather(*tasks)
        admission.refuse_early(HEAVY)  # an empty queue refuses nobody
        return refused.value, admission.rejected["queue_full"]

    refused, counted = asyncio.run(main())
    assert refused.code == "queue_full" and counted == 1
