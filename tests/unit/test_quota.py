"""Quotas (serve/usage/quota.py): a sliding window of requests and tokens, a UTC day of tokens."""

from raylm.serve.usage.quota import Limits, Quotas, duration
from raylm.serve.usage.sink import reserve_tokens


def test_requests_per_minute_hold_in_any_60_seconds_and_headers_count_down():
    q = Quotas({"a": Limits(requests_per_minute=3)})
    decisions = [q.admit("a", 0, now=t) for t in (0.0, 10.0, 20.0, 30.0)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["2", "1", "0", "0"]
    refused = decisions[-1]
    assert refused.code == "rate_limit_exceeded" and refused.retry_after_s == 30.0  # the first leaves at 60
    assert decisions[2].headers["x-ratelimit-reset-requests"] == "1m0s"  # the newest (20) leaves at 80
    assert q.admit("a", 0, now=60.0).allowed  # the one from 0 has left
    assert not q.admit("a", 0, now=69.9).allowed
    assert q.admit("b", 10**9, now=0.0).allowed and q.admit("b", 0, now=0.0).headers == {}  # no quota


def test_tokens_are_reserved_then_settled_with_the_engines_count():
    q = Quotas({"a": Limits(tokens_per_minute=1000)})
    first = q.admit("a", 600, now=0.0)
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "400"
    refused = q.admit("a", 500, now=1.0)
    assert not refused.allowed and refused.retry_after_s == 59.0
    q.settle(first.ticket, 100, now=2.0)  # it took 100 tokens, not 600
    assert q.admit("a", 500, now=3.0).allowed
    too_big = q.admit("a", 1001, now=4.0)
    assert not too_big.allowed and "Request too large" in too_big.message


def test_the_daily_budget_counts_batch_work_and_resets_at_midnight_utc():
    q = Quotas({"a": Limits(tokens_per_day=1000)})
    day = 86400.0 * 20000
    q.count("a", 700, now=day + 10)  # a Batch API line's tokens
    assert q.admit("a", 300, now=day + 20).allowed  # the budget may be reached, not passed by a new request
    spent = q.admit("a", 1, now=day + 30)
    assert not spent.allowed and spent.code == "insufficient_quota" and spent.retry_after_s == 86400 - 30
    assert q.admit("a", 1, now=day + 86400).allowed
    q2 = Quotas({"a": Limits(tokens_per_day=1000)})
    q2.restore_day({"a": 1000, "unknown": 5}, now=day)  # after a restart: from the usage store
    assert not q2.admit("a", 1, now=day + 1).allowed


def test_a_settlement_after_the_window_moves_only_the_day():
    q = Quotas({"a": Limits(tokens_per_minute=100, tokens_per_day=10_000)})
    d = q.admit("a", 50, now=0.0)
    q.settle(d.ticket, 5000, now=120.0)
    use = q.snapshot(now=120.0)["a"]
    assert (use["tokens"], use["tokens_today"]) == (0, 5000)
    q.settle(d.ticket, 1, now=121.0)  # settled once only
    assert q.snapshot(now=121.0)["a"]["tokens_today"] == 5000


def test_reset_durations_read_as_openais():
    assert [duration(s) for s in (0.0174, 1.0, 1.55, 59.99, 60.0, 360.0, 3723.0)] == [
        "18ms", "1s", "1.6s", "60s", "1m0s", "6m0s", "1h2m3s"]


def test_a_reservation_is_the_bodys_characters_over_four_plus_what_it_may_generate():
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    assert 100 <= reserve_tokens(body) - 100 <= 130
    assert reserve_tokens({"prompt": "abcd" * 10}) == len('{"prompt":"' + "abcd" * 10 + '"}') // 4


def test_serve_refuses_to_start_on_a_usage_database_it_cannot_open(tmp_path):
    """Before Ray starts: the reason, the database named without its password."""
    from typer.testing import CliRunner

    from raylm.cli import app

    config = tmp_path / "raylm.yaml"
    config.write_text("serve:\n  usage:\n    database: postgresql://raylm:hunter2@127.0.0.1:1/usage\n")
    result = CliRunner().invoke(app, ["serve", str(config)])
    assert result.exit_code == 2
    assert "usage database" in result.output and "127.0.0.1:1" in result.output and "hunter2" not in result.output


def test_a_malformed_quota_is_a_start_up_error_naming_the_field():
    import pytest
    from pydantic import ValidationError

    from raylm.config import AppConfig

    with pytest.raises(ValidationError, match=r"serve.tenants.a.tokens_per_minute"):
        AppConfig.model_validate({"serve": {"tenants": {"a": {"tokens_per_minute": "lots"}}}})
    with pytest.raises(ValidationError, match="quotas, which count usage"):
        AppConfig.model_validate({"serve": {"usage": {"enabled": False}, "tenants": {"a": {"tokens_per_day": 5}}}})


def test_the_usage_sink_keeps_what_it_could_not_send_and_drops_the_oldest_past_its_bound():
    import asyncio

    from raylm.contract import UsageRecord
    from raylm.serve.usage.sink import UsageSink

    class Ledger:  # a Serve handle's shape: .record.remote(...) is awaitable; down until told otherwise
        def __init__(self):
            self.up, self.got, self.record = False, [], self

        async def remote(self, records, settles, dropped):
            if not self.up:
                raise ConnectionError("the Ledger is restarting")
            self.got.append((len(records), settles, dropped))

    async def main():
        ledger = Ledger()
        sink = UsageSink(ledger, interval_s=3600, max_buffered=3)
        for i in range(5):
            sink.add(UsageRecord(0.0, f"r{i}", "t", "", "m", "", "chat", 200, "", 2, 0, 3), ticket=i + 1)
        await sink.flush()  # down: all kept (the bound, 3)
        ledger.up = True
        await sink.flush()
        await sink.close()
        return ledger.got, [r.request_id for r in sink.records]

    got, left = asyncio.run(main())
    assert got == [(3, [(3, 5), (4, 5), (5, 5)], 2)] and left == []  # settles bounded too: 1 and 2 stay reserved
