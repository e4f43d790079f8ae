"""The Grafana dashboard queries metrics the service defines."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_raylm_metric_on_the_dashboard_exists():
    exprs = [t["expr"] for p in json.loads((ROOT / "deploy/grafana/raylm.json").read_text())["panels"]
             for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"ray_(raylm_\w+)", e)}
    source = "".join(p.read_text() for p in (ROOT / "src/raylm/serve").rglob("*.py"))
    defined = set(re.findall(r'metrics\.\w+\(\s*"(raylm_\w+)"', source))
    assert used and used <= defined, used - defined
    assert {"raylm_usage_tokens_total", "raylm_quota_used_ratio"} <= used  # usage and quotas per tenant
    assert len(exprs) >= 14
