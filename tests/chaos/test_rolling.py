"""Updates and scale-down drop nothing (issue 25): under steady load, streamed and not, a changed config
replaces every replica (Serve's rolling update; the ingress too), then the model goes from 2 replicas to 1,
both applied in place as `raylm serve` does on SIGHUP (`Service.apply`).

Not in `make test` (about 4 min: each step starts new engines on 2 cores): run with `make test-slow`.
Loopback only; bounded in time.
"""

import time

import pytest

from scenario import report, steady, tally

from raylm.config import AppConfig


@pytest.mark.slow
def test_a_changed_config_and_a_scale_down_drop_nothing(rolling_service):
    svc = rolling_service
    tree = svc.config.model_dump()
    with steady(svc.url) as results:
        time.sleep(5)
        (relay,) = tree["models"]
        relay["engine_args"] = {**relay["engine_args"], "max_model_len": 512}  # every replica replaced
        began = time.monotonic()
        changed_s = svc.apply(AppConfig.model_validate(tree))
        relay["replicas"] = 1
        scaled_s = svc.apply(AppConfig.model_validate(tree))
        time.sleep(5)
    seen = tally(results)
    failed = seen["failed"]
    report("rolling", requests=len(results), streams=seen["streams"], failed=len(failed),
           config_applied_s=changed_s, scaled_down_s=scaled_s, failures=seen["failures"],
           failed_at_s=",".join(f"{t - began:.1f}" for t, r in results if not r.ok))
    assert len(results) > 50
    assert not failed, failed[:3]
