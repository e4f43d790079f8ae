"""The status page's arithmetic: the last minute's TTFT percentiles, tenants' shares and tokens/s."""

from raylm.serve.status import TokenRate, Window, render


def test_window_keeps_the_last_minute_per_model():
    now = [0.0]
    window = Window(span_s=60, clock=lambda: now[0])
    window.ttft("a", 9.0)  # leaves the window below
    now[0] = 30.0
    for seconds in (0.1, 0.2, 0.3, 0.4):
        window.ttft("a", seconds)
    for tenant in ("gold", "gold", "gold", "free"):
        window.answered("a", tenant)
    now[0] = 70.0
    summary = window.summary()["a"]
    assert (summary["ttft_p50_s"], summary["ttft_p99_s"]) == (0.3, 0.4)
    assert summary["answered"] == 4 and summary["tenant_shares"] == {"free": 0.25, "gold": 0.75}
    now[0] = 100.0
    assert window.summary() == {}
    for _ in range(1000):  # never asked for a summary, it still keeps only the last minute
        now[0] += 1.0
        window.answered("a", "gold")
    assert window.kept() <= 61


def test_token_rate_over_the_window():
    rate = TokenRate(span_s=60)
    assert rate.sample(0.0, 0) == 0.0
    assert rate.sample(10.0, 500) == 50.0
    assert rate.sample(100.0, 500) == 0.0  # nothing generated in the last minute


def test_render_reads_at_a_glance():
    status = {"window_s": 60.0, "models": {"m": {
        "status": "HEALTHY", "replicas": {"RUNNING": 2}, "message": "", "running": 3, "queued": 1,
        "tokens_per_s": 12.5, "ttft_p50_s": 0.05, "ttft_p99_s": 0.2, "answered": 9,
        "tenant_shares": {"gold": 0.667, "free": 0.333}, "replica_reports": []}}}
    from rich.console import Console

    console = Console(width=200, record=True)
    for part in render(status):
        console.print(part)
    text = console.export_text()
    assert "2 running" in text and "50 ms" in text and "200 ms" in text and "gold 67%" in text
