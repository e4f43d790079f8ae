"""A quota holds across ingress replicas: 4 of them, one tenant at twice its requests per minute for a minute.

Not in `make test` (its own service and a minute of traffic, ~2.5 min): run with `make test-slow`."""

import asyncio
import time

import httpx
import pytest
from scenario import auth, chaos_config, report

LIMIT = 600  # requests per minute
RATE = 20.0  # requests per second sent: twice the limit
WINDOW_S = 60.0


@pytest.fixture(scope="module")
def quota_service(tiny_model, tmp_path_factory):
    from raylm.config import AppConfig
    from raylm.serve.control.service import start

    tree = chaos_config(tiny_model, only=("tiny",)).model_dump()
    tree["serve"].update(ingress_replicas=4, tenants={"heavy": {"requests_per_minute": LIMIT}},
                         usage={"database": str(tmp_path_factory.mktemp("usage") / "usage.db")})
    svc = start(AppConfig.model_validate(tree))
    yield svc
    svc.stop()


async def _flood(url: str) -> list[tuple[float, int]]:
    """RATE requests a second for WINDOW_S, each on a new connection, so the kernel spreads them over the ingress
    replicas (SO_REUSEPORT); (time sent, status) for each."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def one(at: float) -> tuple[float, int]:
            await asyncio.sleep(max(at - time.monotonic(), 0))
            r = await client.post(f"{url}/tokenize", json={"model": "tiny", "prompt": "hello"}, headers=auth("heavy"))
            return at, r.status_code
        t0 = time.monotonic() + 0.5
        return await asyncio.gather(*(one(t0 + i / RATE) for i in range(int(RATE * WINDOW_S))))


@pytest.mark.slow
def test_requests_per_minute_hold_across_four_ingress_replicas(quota_service):
    answers = asyncio.run(_flood(quota_service.url))
    statuses = [s for _, s in answers]
    admitted, refused = statuses.count(200), statuses.count(429)
    report("quota_4_ingress", limit=LIMIT, sent=len(answers), admitted=admitted, refused=refused,
           error=f"{(admitted - LIMIT) / LIMIT:+.1%}")
    assert admitted + refused == len(answers)
    assert abs(admitted - LIMIT) <= 0.05 * LIMIT
