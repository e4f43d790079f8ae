import os

import pytest

from scenario import chaos_config


# Models started only when their test runs (an engine on 2 cores costs every test): the slow autoscaling test's.
_ONLY_FOR = {"auto": ("test_load_scales_a_model_up_and_idleness_down",)}


@pytest.fixture(scope="module")
def chaos_service(tiny_model, request):
    collected = {item.name for item in request.session.items}
    models = ("tiny", "pair", "cold") + tuple(m for m, tests in _ONLY_FOR.items() if collected & set(tests))
    yield from _service(chaos_config(tiny_model, only=models))


def _service(config):
    from raylm.serve.control.service import start

    svc = start(config)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def fair_service(tiny_model):
    """Only the model under test. Beside the other scenario engines, pinned to the same core, the light
    tenant's first tokens stalled for 150-550 ms every few seconds (the `pair` engines' 2 s health probes):
    the test then measured the neighbours, not the queue."""
    config = chaos_config(tiny_model, only=("tiny",))
    if not os.environ.get("RAYLM_TRACE_FAIRNESS"):
        yield from _service(config)
        return
    # Where a slow request's time went, span by span (docs/usage.md): RAYLM_TRACE_FAIRNESS=1 make test-slow
    from otlp import OTLPReceiver

    with OTLPReceiver() as receiver:
        tree = config.model_dump()
        tree["serve"]["otlp_endpoint"] = receiver.endpoint
        for svc in _service(type(config).model_validate(tree)):
            svc.receiver = receiver
            yield svc


@pytest.fixture(scope="module")
def relay_service(tiny_model):
    """Only `relay` (2 replicas, room for 70 streams): tests/chaos/test_failover.py."""
    yield from _service(chaos_config(tiny_model, only=("relay",)))


@pytest.fixture(scope="module")
def rolling_service(tiny_model):
    """Only `relay` (2 replicas), with a short drain: each step of the rolling test replaces every replica."""
    config = chaos_config(tiny_model, only=("relay",))
    tree = config.model_dump()
    tree["serve"]["drain_s"] = 20
    yield from _service(type(config).model_validate(tree))
