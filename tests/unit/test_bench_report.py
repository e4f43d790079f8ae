"""Bench figures from known request results: percentiles, TPOT, goodput, the report files."""

import asyncio
import dataclasses
import json
import time

import pytest

from raylm.bench.load import LoadResult, LoopLag, RequestResult, closed_loop
from raylm.bench.report import markdown, parse_slo, summarize, tpot, write


def _result(ttft: float, e2e: float, tokens: int = 11, status: int = 200, error: str | None = None) -> RequestResult:
    gaps = (e2e - ttft) / (tokens - 1)
    return RequestResult(status, ttft, e2e, tokens if status == 200 else 0, error, prompt_tokens=100,
                         itl_s=(gaps,) * (tokens - 1))


LOAD = LoadResult(4, 2.0, (
    _result(0.1, 1.1), _result(0.2, 1.2), _result(0.3, 2.3), _result(0.4, 1.4),
    RequestResult(429, None, 0.01, retry_after="1"), _result(0.1, 0.5, status=200, error="internal_error")))


def test_slo_parses_seconds_and_rejects_unknown_bounds():
    assert parse_slo("ttft=0.5,itl=50e-3, e2e=2s") == {"ttft": 0.5, "itl": 0.05, "e2e": 2.0}
    assert parse_slo(None) == {}
    with pytest.raises(ValueError, match="ttft, itl, e2e"):
        parse_slo("tbt=1")


def test_a_point_counts_only_complete_answers():
    point = summarize(LOAD, "concurrency", 4, parse_slo("ttft=0.25,itl=0.15"))
    assert (point.requests, point.ok) == (6, 4)
    assert point.statuses == {"200": 4, "200:internal_error": 1, "429": 1}
    assert point.output_tok_s == pytest.approx(4 * 11 / 2.0)
    assert point.ttft_s["p50"] == pytest.approx(0.25)  # between the 2nd and 3rd of 0.1..0.4
    assert point.e2e_s["p99"] == pytest.approx(2.3, abs=0.03)
    # TPOT: (e2e - ttft) / 10 = 0.1, 0.1, 0.2, 0.1; the SLO keeps the first two (ttft ≤ 0.25, TPOT ≤ 0.15)
    assert [tpot(r) for r in LOAD.ok] == pytest.approx([0.1, 0.1, 0.2, 0.1])
    assert point.goodput_req_s == pytest.approx(2 / 2.0)


def test_the_report_has_json_markdown_and_plots(tmp_path):
    points = [summarize(LOAD, "concurrency", c) for c in (1, 4)] + [summarize(LOAD, "rate", 2.0)]
    files = write(points, [LOAD] * 3, tmp_path, {"model": "m", "url": "u"})
    assert {f.name for f in files} == {"results.json", "report.md", "throughput_latency_concurrency.png",
                                       "throughput_latency_rate.png", "latency_cdf.png"}
    assert all(f.stat().st_size > 0 for f in files)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [p["value"] for p in saved["points"]] == [1, 4, 2.0]
    table = markdown(points)
    assert "| c=4 | 4/6 |" in table and "| 2 req/s |" in table


def test_a_client_whose_loop_lags_says_so_in_the_report():
    async def blocked() -> float | None:
        async with LoopLag() as lag:
            await asyncio.sleep(0.05)  # the sampler runs
            time.sleep(0.3)  # the client's loop is held, as by a busy or starved load generator
            await asyncio.sleep(0.05)
        return lag.p99_s

    lagged = asyncio.run(blocked())
    assert lagged is not None and lagged >= 0.25
    quiet, slow = (summarize(dataclasses.replace(LOAD, client_lag_p99_s=s), "concurrency", 4) for s in (0.002, lagged))
    assert "lagged" not in markdown([quiet])
    assert f"{1000 * lagged:.0f} ms at c=4" in markdown([quiet, slow]) and "lagged" in markdown([quiet, slow])


@pytest.mark.parametrize("backoff", [True, False])
def test_a_refused_worker_waits_its_retry_after_only_with_backoff(backoff):
    sent: list[float] = []

    async def sender(i: int) -> RequestResult:
        sent.append(time.perf_counter())
        return RequestResult(429, retry_after="0.3") if i == 0 else RequestResult(200)

    result = asyncio.run(closed_loop(sender, 1, 2, 10, backoff=backoff))
    assert [r.status for r in result.results] == [429, 200]
    assert (sent[1] - sent[0] >= 0.3) == backoff  # raylm bench waits as OpenAI's SDKs do; a flood does not
    assert RequestResult(503, retry_after="Wed, 21 Oct 2026 07:28:00 GMT").backoff_s == 0.0  # a date: not waited
