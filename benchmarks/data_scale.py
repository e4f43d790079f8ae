"""Does a data job's cost grow with its rows, or with rows × blocks? Three measures, each at several sizes:

    python benchmarks/data_scale.py [--sizes 10000,100000,1000000] [--batch-lines 1000,10000,50000]
                                    [--baseline-src PATH] [--skip tokenize,batch]

    reader    plan + read every block of a JSONL file as `raylm data` does, in one process: CPU seconds per row
    tokenize  `raylm data tokenize IN OUT` end to end; rows/s past start-up (a 100-row job's wall time), and
              the marginal rate between sizes (rows added / time added: no start-up in it, so no start-up noise)
    batch     a Batch API job of completions (the tiny test model, 1 token each) through `raylm serve`:
              created → completed; lines/s past start-up (a second 100-line batch's time: the first pays for
              the service's first Ray Data job), the marginal rate, and the rate while answering (polls: from
              the first answers saved to the last; no start-up in it)

`--baseline-src` runs each measure again with another checkout's `src` first on PYTHONPATH (e.g. a
`git worktree` of the previous commit), in the same run: the before/after table of BENCHMARKS.md. Results:
benchmarks/results/data_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness import HERE, cpu_flags, free_port
from helpers import make_tiny_llama

from raylm.models import default_cache_dir

READER = r"""
import json, sys, time
import pyarrow as pa
from raylm.data import io, job
path, per_block = sys.argv[1], None
start = time.process_time()
if hasattr(io, "scan"):  # this tree: one scan, block reads
    scans = [io.scan(path)]
    total = sum(s.rows for s in scans)
    per_block = min(max(256, -(-total // 4)), 16 * 256)
    blocks = job.plan_blocks(scans, per_block)
    read = job._reader("text", {})
    rows = sum(len(read(pa.table({"block": [json.dumps(b)]}))) for b in blocks)
else:  # before: rows counted by reading the file, each block reading it again
    counts = {path: io.count_rows(path, "text")}
    total = counts[path]
    per_block = min(max(256, -(-total // 4)), 16 * 256)
    blocks = job.plan_blocks(counts, per_block)
    read = job._reader("text", {})
    rows = sum(len(read({k: [b[k]] for k in b})) for b in blocks)
print(json.dumps({"rows": rows, "blocks": len(blocks), "cpu_s": time.process_time() - start}))
"""


def env_for(src: str | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def make_input(folder: Path, rows: int) -> Path:
    path = folder / f"in-{rows}.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": i, "text": f"row {i}: the quick brown fox jumps over the lazy dog"}) + "\n")
    return path


def reader(path: Path, src: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True, env=env_for(src),
                         timeout=3600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_us_per_row"] = 1e6 * result["cpu_s"] / result["rows"]
    return result


def tokenize(path: Path, out: Path, src: str | None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raylm.cli", "data", "tokenize", str(path), str(out)], env=env_for(src),
                   capture_output=True, text=True, timeout=3600, check=True)
    return time.perf_counter() - start


def batch_lines(folder: Path, lines: int) -> Path:
    path = folder / f"batch-{lines}.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for i in range(lines):
                body = {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 1}
                f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
                        + "\n")
    return path


def serve_tiny(work: Path, src: str | None) -> tuple[subprocess.Popen, str]:
    model = make_tiny_llama(default_cache_dir() / "models" / "tiny-llama-bench")
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "batch.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "models": [{"name": "tiny", "source": str(model), "num_cpus": 1,
                    "engine_args": {"enforce_eager": True, "max_model_len": 256},
                    "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                    "admission": {"batch_max_running": 32, "batch_quiet_s": 0}}],
        "serve": {"port": port, "metrics_port": free_port(), "batch_dir": str(work / "batches"),
                  "batch_max_requests": 60000, "batch_max_file_bytes": 64 * 2**20}}))
    proc = subprocess.Popen([sys.executable, "-m", "raylm.cli", "serve", str(config)], env=env_for(src),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise TimeoutError("raylm serve did not become ready")


def run_batch(url: str, path: Path) -> tuple[float, float | None]:
    """Created → completed, in seconds; and the lines/s while answering: from the first poll that shows answers
    saved to the last poll that shows more (None where fewer than two polls did: a small batch)."""
    with httpx.Client(base_url=f"{url}/v1", timeout=120) as client:
        with path.open("rb") as f:
            file_id = client.post("/files", data={"purpose": "batch"}, files={"file": (path.name, f)}).json()["id"]
        start = time.perf_counter()
        batch = client.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                              "completion_window": "24h"}).json()
        seen: list[tuple[float, int]] = []  # (when, lines answered) each time the count moved
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.get(f"/batches/{batch['id']}").json()
            done = batch["request_counts"]["completed"] if batch["status"] == "in_progress" else 0
            if done and (not seen or done > seen[-1][1]):
                seen.append((time.perf_counter(), done))
        took = time.perf_counter() - start
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == \
            batch["request_counts"]["total"], batch
        answering = (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0]) if len(seen) > 2 else None
        return took, answering


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch-lines", default="1000,10000,50000")
    parser.add_argument("--baseline-src", default=None)
    parser.add_argument("--skip", default="", help="measures to leave out: tokenize, batch")
    parser.add_argument("--trees", default="this,baseline", help="which of this tree and the baseline to run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lines = [int(s) for s in args.batch_lines.split(",")]
    trees = {"this": None, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    trees = {tree: src for tree, src in trees.items() if tree in args.trees.split(",")}
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d"), "trees": {}}
    with tempfile.TemporaryDirectory(prefix="raylm-data-scale-") as tmp:
        work = Path(tmp)
        for tree, src in trees.items():
            got = results["trees"][tree] = {"reader": {}, "tokenize": {}, "batch": {}}
            for n in sizes:
                got["reader"][n] = reader(make_input(work, n), src)
                print(tree, "reader", n, got["reader"][n], flush=True)
            if "tokenize" not in skip:
                startup = tokenize(make_input(work, 100), work / f"out-{tree}-100", src)
                got["tokenize"]["startup_s"] = startup
                for n in sizes:
                    wall = tokenize(make_input(work, n), work / f"out-{tree}-{n}", src)
                    got["tokenize"][n] = {"wall_s": wall, "rows_per_s": n / (wall - startup) if wall > startup else None}
                    print(tree, "tokenize", n, got["tokenize"][n], flush=True)
            if "batch" not in skip:
                proc, url = serve_tiny(work / f"serve-{tree}", src)
                try:
                    # The first batch of a service also pays for its first Ray Data job (imports, workers): that
                    # one is a warm-up; the start-up subtracted below is a second 100-line batch's time.
                    got["batch"]["first_s"] = run_batch(url, batch_lines(work, 100))[0]
                    startup = run_batch(url, batch_lines(work, 100))[0]
                    got["batch"]["startup_s"] = startup
                    for n in lines:
                        took, answering = run_batch(url, batch_lines(work, n))
                        got["batch"][n] = {"wall_s": took, "lines_per_s": n / (took - startup) if took > startup else None,
                                           "answering_lines_per_s": answering}
                        print(tree, "batch", n, got["batch"][n], flush=True)
                finally:
                    stop(proc)
    report(results, sizes, lines, args.out)


NOISE = "— (inside the start-up's own spread)"


def _rate(value: float) -> str:
    """A rate past start-up, or a dash where the job took no longer than the start-up alone (a small job's work
    is shorter than the start-up's spread between runs: then only the marginal rates say anything)."""
    return NOISE if value is None else f"{value:,.0f}"


def report(results: dict, sizes: list[int], lines: list[int], out: Path) -> None:
    text = [f"CPU flags: {results['cpu_flags']}; date {results['date']}", ""]
    for tree, got in results["trees"].items():
        text += [f"### {tree}", "", "| measure | size | figure |", "|---|---|---|"]
        for n in sizes:
            r = got["reader"][n]
            text.append(f"| reader: CPU per row | {n:,} rows ({r['blocks']} blocks) | {r['cpu_us_per_row']:.1f} µs |")
        for n in sizes if got["tokenize"] else []:
            t = got["tokenize"][n]
            text.append(f"| tokenize: rows/s past start-up ({got['tokenize']['startup_s']:.1f} s) | {n:,} | "
                        f"{_rate(t['rows_per_s'])} (wall {t['wall_s']:.1f} s) |")
        for n in lines if got["batch"] else []:
            b = got["batch"][n]
            text.append(f"| Batch API: lines/s past start-up ({got['batch']['startup_s']:.1f} s) | {n:,} | "
                        f"{_rate(b['lines_per_s'])} (wall {b['wall_s']:.1f} s) |")
        for n in lines if got["batch"] else []:
            text.append(f"| Batch API: lines/s while answering (first answers saved → last) | {n:,} | "
                        f"{_rate(got['batch'][n]['answering_lines_per_s'])} |")
        for kind, unit, sizes_of in (("tokenize", "rows", sizes), ("batch", "lines", lines)):
            walls = [(n, got[kind][n]["wall_s"]) for n in sizes_of if got[kind]]
            for (a, wa), (b, wb) in zip(walls, walls[1:]):  # the cost of the rows added: no start-up in it
                text.append(f"| {kind}: {unit}/s from {a:,} to {b:,} (marginal) | | {(b - a) / max(wb - wa, 1e-9):,.0f} |")
        if got["tokenize"] and None not in (got["tokenize"][sizes[0]]["rows_per_s"],
                                            got["tokenize"][sizes[-1]]["rows_per_s"]):
            text.append(f"| tokenize: rows/s at {sizes[-1]:,} / at {sizes[0]:,} | | "
                        f"**{got['tokenize'][sizes[-1]]['rows_per_s'] / got['tokenize'][sizes[0]]['rows_per_s']:.2f}×** "
                        "(target ≥ 0.9×) |")
        if got["batch"] and None not in (got["batch"][lines[0]]["lines_per_s"], got["batch"][lines[-1]]["lines_per_s"]):
            text.append(f"| Batch API: lines/s at {lines[-1]:,} / at {lines[0]:,} | | "
                        f"**{got['batch'][lines[-1]]['lines_per_s'] / got['batch'][lines[0]]['lines_per_s']:.2f}×** "
                        "(target ≥ 0.9×) |")
        answering = [got["batch"][n]["answering_lines_per_s"] for n in (lines[0], lines[-1])] if got["batch"] else [None]
        if None not in answering:
            text.append(f"| Batch API: lines/s while answering at {lines[-1]:,} / at {lines[0]:,} | | "
                        f"**{answering[1] / answering[0]:.2f}×** |")
        text.append("")
    markdown = "\n".join(text) + "\n"
    print("\n" + markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.md").write_text(markdown)
    (out / "data_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
