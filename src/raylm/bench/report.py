"""What one load point measured, goodput under an SLO, and the report: JSON, markdown and PNG plots.

Definitions (those of vLLM's `vllm bench serve`):
    TTFT    request sent → first chunk with text
    ITL     gap between two chunks with text, over all streams (a chunk may carry several tokens)
    TPOT    a request's (E2E - TTFT) / (output tokens - 1): its mean time per output token
    E2E     request sent → last byte
    goodput requests per second that met every bound of the SLO (ttft, itl: TPOT, e2e; seconds)
    client lag  how late the load generator's own event loop woke a task (p99): over CLIENT_LAG_WARN_S, the
            report says that the client's queue is in its latencies
Token counts are the server's `usage`. Percentiles interpolate between ranks (numpy's default).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raylm.bench.load import LoadResult, RequestResult, percentile

QUANTILES = (0.5, 0.9, 0.99)
# The load generator's loop wakes a task this late (p99) or later: its own queue is in what it measures.
CLIENT_LAG_WARN_S = 0.05
SLO_KEYS = ("ttft", "itl", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=0.5,itl=0.05` → {"ttft": 0.5, "itl": 0.05} (seconds)."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in SLO_KEYS or not value:
            raise ValueError(f"SLO bounds are {', '.join(SLO_KEYS)} in seconds, as ttft=0.5,itl=0.05; got {part!r}")
        slo[key] = float(value.strip().removesuffix("s"))
    return slo


def tpot(r: RequestResult) -> float | None:
    if r.ttft_s is None or r.latency_s is None or r.output_tokens < 2:
        return None
    return (r.latency_s - r.ttft_s) / (r.output_tokens - 1)


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_s, "itl": tpot(r), "e2e": r.latency_s}
    return r.ok and all(values[k] is not None and values[k] <= bound for k, bound in slo.items())


def point_label(load: str, value: float) -> str:
    """How a load point is named in tables, plots and the progress bar: `c=16` or `4 req/s`."""
    return f"c={value:g}" if load == "concurrency" else f"{value:g} req/s"


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": (percentile(values, q) if values else None) for q in QUANTILES}


@dataclass
class Point:
    """One load point's figures; latencies in seconds."""

    load: str  # "concurrency" or "rate"
    value: float
    requests: int
    ok: int
    duration_s: float
    output_tok_s: float
    req_s: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    statuses: dict[str, int]
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    goodput_req_s: float | None = None
    slo: dict[str, float] = field(default_factory=dict)
    client_lag_p99_s: float | None = None  # the load generator's own event loop (load.LoopLag)

    @property
    def label(self) -> str:
        return point_label(self.load, self.value)


def summarize(result: LoadResult, load: str, value: float, slo: dict[str, float] | None = None) -> Point:
    ok = result.ok
    wall = max(result.wall_s, 1e-9)
    statuses = Counter(str(r.status) if not r.error else f"{r.status}:{r.error}" for r in result.results)
    return Point(
        load=load, value=value, requests=len(result.results), ok=len(ok), duration_s=result.wall_s,
        output_tok_s=sum(r.output_tokens for r in ok) / wall, req_s=len(ok) / wall,
        prompt_tokens_mean=sum(r.prompt_tokens for r in ok) / max(len(ok), 1),
        output_tokens_mean=sum(r.output_tokens for r in ok) / max(len(ok), 1),
        statuses=dict(sorted(statuses.items())),
        ttft_s=_quantiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_s=_quantiles([gap for r in ok for gap in r.itl_s]),
        tpot_s=_quantiles([t for r in ok if (t := tpot(r)) is not None]),
        e2e_s=_quantiles([r.latency_s for r in ok if r.latency_s is not None]),
        goodput_req_s=sum(meets(r, slo) for r in ok) / wall if slo else None, slo=dict(slo or {}),
        client_lag_p99_s=result.client_lag_p99_s)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:.1f}"


def markdown(points: list[Point], title: str = "raylm bench") -> str:
    slo = points[0].slo if points else {}
    head = ["load", "ok/sent", "output tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
            "E2E p50/p90/p99 ms", "statuses"]
    if slo:
        head.insert(4, "goodput req/s")
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = [p.label, f"{p.ok}/{p.requests}", f"{p.output_tok_s:.1f}", f"{p.req_s:.2f}",
               "/".join(_ms(v) for v in p.ttft_s.values()), "/".join(_ms(v) for v in p.itl_s.values()),
               "/".join(_ms(v) for v in p.e2e_s.values()), ", ".join(f"{k}×{n}" for k, n in p.statuses.items())]
        if slo:
            row.insert(4, f"{p.goodput_req_s:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    if slo:
        lines += ["", "SLO (s): " + ", ".join(f"{k} ≤ {v:g}" for k, v in slo.items()) + " (itl: each request's TPOT)"]
    lagged = [p for p in points if p.client_lag_p99_s is not None and p.client_lag_p99_s > CLIENT_LAG_WARN_S]
    if lagged:
        lines += ["", "This client's own event loop lagged (p99 " + ", ".join(
            f"{1000 * p.client_lag_p99_s:.0f} ms at {p.label}" for p in lagged) + "): the latencies there count "
            "its own queue too. Run the load from another machine, or at a lower load, to measure the server alone."]
    return "\n".join(lines) + "\n"


def plot(points: list[Point], results: list[LoadResult], out_dir: Path) -> list[Path]:
    """throughput_latency.png (by load point) and latency_cdf.png (TTFT and E2E per point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for load in ("concurrency", "rate"):
        mine = [p for p in points if p.load == load]
        if not mine:
            continue
        x = [p.value for p in mine]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.plot(x, [p.output_tok_s for p in mine], "o-")
        left.set(xlabel=load, ylabel="output tokens/s", title="Throughput")
        for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
            for q, style in (("p50", "o-"), ("p99", "x--")):
                ys = [getattr(p, key)[q] for p in mine]
                right.plot(x, [1000 * y if y is not None else float("nan") for y in ys], style, label=f"{name} {q}")
        right.set(xlabel=load, ylabel="ms", yscale="log", title="Latency")
        right.legend(fontsize=7)
        for ax in (left, right):
            if load == "concurrency":
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"throughput_latency_{load}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p, result in zip(points, results):
        for ax, values in zip(axes, ([r.ttft_s for r in result.ok if r.ttft_s is not None],
                                     [r.latency_s for r in result.ok if r.latency_s is not None])):
            if values:
                ordered = sorted(values)
                ax.plot([1000 * v for v in ordered], [(i + 1) / len(ordered) for i in range(len(ordered))],
                        label=p.label)
    for ax, name in zip(axes, ("TTFT", "E2E latency")):
        ax.set(xlabel="ms", ylabel="fraction of requests", title=f"{name} CDF", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*files, path]


def write(points: list[Point], results: list[LoadResult], out_dir: Path, meta: dict) -> list[Path]:
    """results.json, report.md and the plots under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points]},
                                                     indent=2))
    (out_dir / "report.md").write_text(markdown(points, f"raylm bench: {meta.get('model')} at {meta.get('url')}")
                                       + "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n")
    return [out_dir / "results.json", out_dir / "report.md", *plot(points, results, out_dir)]
