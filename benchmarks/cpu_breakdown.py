"""Where the CPU goes while a server streams: CPU seconds per process group, per 1,000 output tokens.

    python benchmarks/cpu_breakdown.py URL SERVER_PID [--concurrency 16 --requests 64] [--py-spy 15]

Reads every process under SERVER_PID (psutil) before and after one load point of `raylm bench`'s load,
groups them by role (Serve proxy, ingress, model replica, EngineCore, Ray's own, ...), and prints CPU
seconds per 1,000 output tokens for each group. With --py-spy, py-spy samples the Python processes that
carry requests (proxy, ingress, model replica, API server) during the load and prints each one's hottest
functions by own time. Used to profile raylm against bare vLLM (BENCHMARKS.md).
"""

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import psutil

from harness import process_tree
from raylm.bench.prompts import load_tokenizer, synthetic
from raylm.bench.run import BenchSpec, run_bench
from raylm.models import SMOLLM2

WORKER = "vLLM worker"
ENGINE_CORE = "vLLM EngineCore"  # with one worker on CPU, raylm runs the worker inside this process
ROLES = (("ProxyActor", "serve proxy"), ("ServeReplica:raylm:ingress", "raylm ingress"),
         ("ServeReplica:raylm:model", "raylm model replica"), ("OpenAiIngress", "ray-serve-llm ingress"),
         ("LLMServer", "ray-serve-llm model replica"), ("EngineCore", ENGINE_CORE),
         ("VLLM::Worker", WORKER), ("api_server", "vllm api server"), ("vllm_uni.py", "vllm api server"), ("ServeController", "serve controller"),
         ("raylet", "ray system"), ("gcs_server", "ray system"), ("dashboard", "ray system"),
         ("DashboardAgent", "ray system"), ("RuntimeEnvAgent", "ray system"), ("log_monitor", "ray system"),
         ("monitor", "ray system"), ("raylm.cli serve", "raylm driver"), ("bin/raylm serve", "raylm driver"),
         ("systems/", "peer driver"))


def role(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except psutil.Error:
        return "gone"
    return next((name for key, name in ROLES if key in text), "other")


SAMPLED = ("serve proxy", "raylm ingress", "raylm model replica", "ray-serve-llm ingress",
           "ray-serve-llm model replica", "vllm api server")


def py_spy(root: int, seconds: int, folder: Path) -> list[tuple[str, subprocess.Popen, Path]]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    started = []
    for proc in process_tree(root):
        name = role(proc)
        if name in SAMPLED:
            out = folder / f"{proc.pid}.txt"
            cmd = [exe, "record", "--pid", str(proc.pid), "--duration", str(seconds), "--rate", "50",
                   "--nonblocking", "--format", "raw", "--output", str(out)]
            started.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
    return started


def hottest(path: Path, n: int = 6) -> list[tuple[str, float]]:
    """Functions by own samples (the leaf of each stack), as fractions of all samples."""
    own: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            own[stack.split(";")[-1]] += int(count)
    total = sum(own.values()) or 1
    return [(frame, c / total) for frame, c in own.most_common(n)]


def cpu(root: int) -> Counter:
    """CPU seconds so far of every process under `root`, keyed by (pid, role)."""
    total: Counter = Counter()
    for proc in process_tree(root):
        try:
            t = proc.cpu_times()
            total[(proc.pid, role(proc))] = t.user + t.system
        except psutil.Error:
            pass
    return total


class RoleCPU(Counter):
    """CPU seconds by role; `after - before` counts only processes alive at both reads, plus new ones."""

    def __init__(self, by_pid: Counter) -> None:
        super().__init__()
        self.by_pid = by_pid
        for (_, name), seconds in by_pid.items():
            self[name] += seconds

    def __sub__(self, before: "RoleCPU") -> Counter:
        used: Counter = Counter()
        for key, value in self.by_pid.items():
            used[key[1]] += value - before.by_pid.get(key, 0.0)
        return used


def cpu_by_role(root: int) -> RoleCPU:
    return RoleCPU(cpu(root))


def engine_threads(root: int) -> dict[int, tuple[int, int]]:
    """Each thread of the processes that run the model (vLLM's worker, or EngineCore): the kernel's (ns on a
    core, ns runnable but waiting for one) so far, from /proc/<pid>/task/<tid>/schedstat."""
    found = {}
    for proc in process_tree(root):
        if role(proc) not in (WORKER, ENGINE_CORE):
            continue
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.Error:  # ended since it was listed
            continue
        for tid in tids:
            try:
                run, wait, _ = Path(f"/proc/{proc.pid}/task/{tid}/schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            found[tid] = (int(run), int(wait))
    return found


def busy_thread_shares(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                       wall_s: float) -> tuple[float, float]:
    """Of the model's busy threads (on a core > 10% of the wall: its OpenMP threads), the mean share of the wall
    each spent on a core and waiting for one."""
    spans = [((r - before[t][0]) / 1e9 / wall_s, (w - before[t][1]) / 1e9 / wall_s)
             for t, (r, w) in after.items() if t in before]
    busy = [s for s in spans if s[0] > 0.1] or [(0.0, 0.0)]
    return sum(r for r, _ in busy) / len(busy), sum(w for _, w in busy) / len(busy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("pid", type=int)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--py-spy", type=int, default=0, help="seconds of py-spy sampling during the load")
    args = parser.parse_args()
    prompts = synthetic(load_tokenizer(None, SMOLLM2), args.requests + 8, 100)
    asyncio.run(run_bench(BenchSpec(url=args.url, model=SMOLLM2, prompts=prompts[-8:], concurrency=[8],
                                    requests=8, warmup=0)))
    spec = BenchSpec(url=args.url, model=SMOLLM2, prompts=prompts, concurrency=[args.concurrency],
                     requests=args.requests, warmup=0)
    before = cpu_by_role(args.pid)
    folder = Path(tempfile.mkdtemp(prefix="raylm-pyspy-"))
    spies = py_spy(args.pid, args.py_spy, folder) if args.py_spy else []
    (point, _), = asyncio.run(run_bench(spec))
    by_role = cpu_by_role(args.pid) - before
    tokens = point.output_tok_s * point.duration_s
    print(f"{tokens:.0f} tokens in {point.duration_s:.1f} s ({point.output_tok_s:.1f} tok/s); "
          f"CPU seconds per 1,000 tokens:")
    for name, seconds in by_role.most_common():
        print(f"  {name:28s} {1000 * seconds / tokens:6.2f}")
    print(f"  {'all':28s} {1000 * sum(by_role.values()) / tokens:6.2f}")
    for name, spy, out in spies:
        spy.wait()
        if out.exists():
            print(f"py-spy, {name}: own time by function")
            for frame, share in hottest(out):
                print(f"  {100 * share:5.1f}%  {frame}")
    shutil.rmtree(folder, ignore_errors=True)
