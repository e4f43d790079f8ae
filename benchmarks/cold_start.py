"""How long a model takes from nothing to its first answer, phase by phase, beside bare `vllm serve` and Ray
Serve LLM started the same way; then default `raylm serve` (both bundled models) to `/ready`.

    python benchmarks/cold_start.py [--rounds 2] [--systems raylm,raylm-base,vllm,ray-serve-llm]
                                    [--default default,base] [--no-default]

Systems (harness.py; each started as its own process tree, SmolLM2-135M, bf16 where the CPU has it, else
float32, eager, KV cache 2 GiB, OpenMP threads on every core; rounds alternate the order, A B C D then D C B A):
    raylm           `raylm serve` of the one model: its worker started at once with the replica's imports
                    (serve/replica/warm.py), EngineCore forked from a forkserver (raylm's defaults)
    raylm-base      the same from another checkout ($RAYLM_BASE_SRC: e.g. a `git worktree` of the commit before)
    raylm-spawn     EngineCore spawned, as vLLM does;  raylm-fork  forked from the replica
    vllm            bare `vllm serve`
    ray-serve-llm   Ray Serve LLM (build_openai_app)
"up" is from the command to the first completion answered (harness.running polls every second). For raylm
the phases come from the console (Ray, Serve, placement) and the replica's `start-up of ...` line (its worker
process, the engine's steps); for every system the EngineCore's own lines give weights and KV cache/warm-up.
Then `raylm serve` with no config (SmolLM2 and MiniLM at once) to `/ready`, each variant each round
(--default: default, spawn, fork, base). Results: benchmarks/results/cold_start.{json,md}.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness import SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV, Setup, arguments, cpu_flags, free_port, process_tree, running

from raylm.models import SMOLLM2, default_cache_dir, resolve_source
from raylm.serve.control.service import end_processes

SPAWN = {"RAYLM_ENGINE_CORE_START": "spawn"}
FORK = {"RAYLM_ENGINE_CORE_START": "fork"}
# vLLM's own lines, in every system's logs: (phase, pattern with the seconds)
VLLM_LINES = {"weights": r"Loading weights took ([\d.]+) seconds",
              "KV cache and warm-up": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"}
CONSOLE = re.compile(r"^\s*([\d.]+)s\s+(.+?)\s*$")


def session_logs(console: str) -> Path | None:
    """The Ray session's log folder a `raylm serve` console printed (its `logs` line)."""
    found = re.search(r"(\S+/session_[^/\s]+/logs)", console)
    return Path(found.group(1)) if found else None


def _log_text(folder: Path | None, fallback: str) -> str:
    if folder is None or not folder.is_dir():
        return fallback
    parts = [fallback]
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".log", ".err", ".out"):
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def phases(console: str) -> dict[str, float]:
    """Phase → seconds, from a system's console and (for raylm) the Ray session's logs."""
    text = _log_text(session_logs(console), console)
    out: dict[str, float] = {}
    for line in console.splitlines():  # each phase's time from the command (absolute: models overlap)
        if m := CONSOLE.match(line):
            out[f"console: {m.group(2)} at"] = float(m.group(1))
    startup = re.search(r"start-up of \S+: ([\d.]+)s from (its process|its __init__ on a warm worker[^:]*): (.+)",
                        text)
    if startup:
        warm = "" if startup.group(2) == "its process" else " (warm worker)"
        out[f"replica: total{warm}"] = float(startup.group(1))
        for name, seconds in re.findall(r"(?:^|, )(.+?) ([\d.]+)s(?=, |$)", startup.group(3)):
            out[f"replica: {name}"] = float(seconds)
    for name, pattern in VLLM_LINES.items():
        found = re.findall(pattern, text)
        if found:
            out[f"EngineCore: {name}"] = float(found[0])
    return out


# How each variant of default `raylm serve` differs (--default): base = another checkout's src
# ($RAYLM_BASE_SRC first on PYTHONPATH, e.g. a `git worktree` of the commit before a change).
DEFAULT_VARIANTS = {"default": {}, "spawn": SPAWN, "fork": FORK,
                    "base": {"PYTHONPATH": os.environ.get("RAYLM_BASE_SRC", "")}}


def default_serve(variant: str, work: Path, timeout_s: float = 600) -> tuple[float, dict[str, float]]:
    """`raylm serve` with no config (the two bundled models) from the command to `/ready` answering 200."""
    port, log_path = free_port(), work / f"default-{variant}.log"
    log = open(log_path, "wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **DEFAULT_VARIANTS[variant]}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "raylm.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"raylm serve exited {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            raise TimeoutError(f"not ready after {timeout_s}s; see {log_path}")
        ready_s = time.monotonic() - started
        time.sleep(1)  # the console's last lines
        return ready_s, phases(log_path.read_text(errors="replace"))
    finally:
        tree = process_tree(proc.pid) if proc.poll() is None else []
        if tree:
            proc.terminate()
        end_processes(tree, grace_s=60)
        log.close()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--systems", default="raylm,raylm-base,vllm,ray-serve-llm")
    parser.add_argument("--no-default", action="store_true", help="skip default `raylm serve` to /ready")
    parser.add_argument("--default", default="default,spawn", help=f"its variants: {', '.join(DEFAULT_VARIANTS)}")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]  # none: only default `raylm serve`
    setup = Setup(resolve_source(f"bundled:{SMOLLM2}", default_cache_dir()), SMOLLM2, SMOLLM2_ENGINE_ARGS, SMOLLM2_ENV)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="raylm-cold-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for system in (systems if r % 2 == 0 else systems[::-1]):
                log = work / f"{system}.log"
                log.unlink(missing_ok=True)
                started = time.monotonic()
                try:
                    with running(system, setup, work):
                        up_s = time.monotonic() - started
                        time.sleep(1)
                except Exception as exc:
                    print(f"round {r + 1} {system}: FAILED {exc}", flush=True)
                    continue
                row = {"round": r + 1, "system": system, "up_s": up_s,
                       "phases": phases(log.read_text(errors="replace"))}
                rows.append(row)
                print(f"round {r + 1} {system:14s} up {up_s:5.1f}s  " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row["phases"].items()), flush=True)
            if not args.no_default:
                variants = args.default.split(",")
                for variant in (variants if r % 2 == 0 else variants[::-1]):
                    name = "default raylm serve" + ("" if variant == "default" else f" ({variant})")
                    try:
                        ready_s, found = default_serve(variant, work)
                    except Exception as exc:
                        print(f"round {r + 1} {name}: FAILED {exc}", flush=True)
                        continue
                    rows.append({"round": r + 1, "system": name, "up_s": ready_s, "phases": found})
                    print(f"round {r + 1} {name} /ready {ready_s:5.1f}s  " + ", ".join(
                        f"{k} {v:.1f}" for k, v in found.items()), flush=True)
    report(rows, args.out)


def report(rows: list[dict], out: Path) -> None:
    import ray
    import vllm

    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "ray": ray.__version__, "vllm": vllm.__version__}
    (out / "cold_start.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    lines = [f"# Cold start ({meta['date']}, CPU flags: {meta['cpu_flags']}, {meta['cores']} cores, "
             f"ray {meta['ray']}, vllm {meta['vllm']})", "",
             "Median over rounds, seconds. `up`: command → first completion answered (default serve: `/ready`).",
             "", "| system | up | runs |", "|---|---|---|"]
    for system in systems:
        ups = [row["up_s"] for row in rows if row["system"] == system]
        lines.append(f"| {system} | {statistics.median(ups):.1f} | {', '.join(f'{u:.1f}' for u in ups)} |")
    for system in systems:
        names = list(dict.fromkeys(k for row in rows if row["system"] == system for k in row["phases"]))
        if not names:
            continue
        lines += ["", f"## {system}", "", "| phase | s |", "|---|---|"]
        for name in names:
            values = [row["phases"][name] for row in rows if row["system"] == system and name in row["phases"]]
            lines.append(f"| {name} | {statistics.median(values):.1f} |")
    (out / "cold_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
