"""What the serving benchmarks share: how each system is started on a model, and a clean stop.

    with running("raylm", Setup(model_dir, name, engine_args, env), work) as (url, pid): ...

Systems (each its own process tree, stopped by PID afterwards; only what this harness started):
    raylm           `raylm serve` with this one model
    raylm-base      the same from another checkout's `src` ($RAYLM_BASE_SRC first on PYTHONPATH, e.g. a
                    `git worktree` of the previous commit): before/after in one run
    raylm-nice0     raylm with its workers at nice 0 (raylm's own cluster leaves them at Ray's 15)
    raylm-engine15  raylm with its EngineCore at its replica's niceness (raylm puts it 4 below: 19)
    raylm-pow2      raylm with Serve's own PowerOfTwoChoicesRequestRouter for its models (no burst spread,
                    no adapter affinity): what raylm's routing is measured against
    raylm-spawn     raylm with its EngineCore spawned, as vLLM does (raylm forks it from a forkserver by default)
    raylm-fork      raylm with its EngineCore forked from the replica (opt-in; benchmarks/cold_start.py)
    raylm-cold      raylm as it started replicas before issue 26's warm workers: no warm worker kept
                    (warm_workers: 0) and its EngineCore spawned
    raylm-itl       raylm exporting vLLM's per-token inter-token histogram too (RAYLM_VLLM_TOKEN_METRICS=1), as
                    before raylm dropped it (engine/vllm.py, ray_stat_logger)
    raylm-off       raylm with usage off (no Ledger, no records, no access log, no traces: docs/usage.md)
    raylm-noresume  raylm without mid-stream resume (serve.resume_streams: false): no token ids marked
    raylm-passive   raylm with its engine's idle OpenMP threads sleeping at once (OMP_WAIT_POLICY=PASSIVE in the
                    model's env) instead of libgomp's spin of ~300,000 rounds first (docs/serve.md)
    raylm-batch128  raylm admitting as many sequences as bare `vllm serve` batches on a CPU (its max_num_seqs
                    default, 128: max_running 120 + burst 8), in place of raylm's 32 + 8
    raylm-on        raylm with everything on: usage and the access log, a quota on the (one) tenant, and traces
                    (its own and vLLM's) to an OTLP receiver in this process (tests/otlp.py)
    raylm-traced    raylm's defaults with traces (its own and vLLM's) to that receiver, nothing else on:
                    dataplane.py splits each first token by phase from them
    vllm            bare `vllm serve` (python -m vllm.entrypoints.openai.api_server), same engine arguments
    vllm-uni        the same with raylm's CPU engine layout (the worker inside EngineCore; systems/vllm_uni.py)
    ray-serve-llm   Ray Serve LLM (ray.serve.llm.build_openai_app), same engine arguments, Serve's
                    throughput-optimized mode (suffix `-direct`: its direct streaming with Serve's HAProxy)
    naive           a transformers pipeline per request on Serve (benchmarks/systems/naive_pipeline.py)
Suffix `-bindSPEC` (e.g. `vllm-bind1`) binds the engine's OpenMP threads to those cores instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers import free_port  # noqa: E402  (one free_port, the tests')

from raylm import hardware  # noqa: E402
from raylm.serve.control.service import end_processes  # noqa: E402


# SmolLM2 as the serving benchmarks run it: bf16 where the CPU has it (hardware.fit's choice), float32
# elsewhere (bf16 runs many times slower there), eager, a 4096-token context.
SMOLLM2_ENGINE_ARGS = {"dtype": "bfloat16" if hardware.detect().bf16 else "float32", "max_model_len": 4096,
                       "enforce_eager": True}
# ...and its engine's environment: OpenMP threads on every core (219 against 187 tok/s on one core, BENCHMARKS.md
# §1), a 2 GiB KV cache (vLLM's own default, 92% of the node, does not start beside anything else).
SMOLLM2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 2) - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}


@dataclass(frozen=True)
class Setup:
    """One model as every system serves it: the same weights, engine arguments and engine environment."""

    model_dir: str
    name: str
    engine_args: dict[str, Any]
    env: dict[str, str]
    raylm_model: dict[str, Any] = field(default_factory=dict)  # extra raylm model config (admission, ...)
    raylm_serve: dict[str, Any] = field(default_factory=dict)  # extra raylm serve config (api_keys, tenants, ...)
    api_key: str | None = None  # what the start-up probe sends (raylm_serve's api_keys set)
    ray_llm_lora: dict[str, Any] = field(default_factory=dict)  # Ray Serve LLM's LoraConfig (benchmarks/lora.py)


def vllm_flags(engine_args: dict[str, Any]) -> list[str]:
    """Engine arguments as `vllm serve` flags: {"max_model_len": 256, "enforce_eager": True} → flags."""
    flags = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


# `raylm serve` with Serve's default request router in place of raylm's (system raylm-pow2).
_SERVE_ROUTER = ("from raylm.serve.control import builder; builder.ROUTERS['default'] = "
                 "'ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter'; "
                 "from raylm.cli import app; app(prog_name='raylm')")


# What raylm-off, raylm-noresume and raylm-on change in the service (raylm: the defaults, usage on, no quota,
# no traces, streams resumable).
_SERVICE: dict[str, dict[str, Any]] = {
    "raylm-off": {"usage": {"enabled": False}},
    "raylm-noresume": {"resume_streams": False},
    "raylm-on": {"tenants": {"default": {"requests_per_minute": 10**7, "tokens_per_minute": 10**10}},
                 "access_log": {"enabled": True}}}
# What a system changes in raylm's model config.
_MODEL: dict[str, dict[str, Any]] = {"raylm-batch128": {"admission": {"max_running": 120, "burst": 8}},
                                     "raylm-cold": {"warm_workers": 0}}
# ...and in its model's env.
_MODEL_ENV: dict[str, dict[str, str]] = {"raylm-passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
_RECEIVER: list[Any] = []
TRACED = ("raylm-on", "raylm-traced")  # systems whose traces go to `receiver()`


def receiver() -> Any:
    """One OTLP/HTTP receiver for this process's runs (it keeps their spans: tests/otlp.py)."""
    if not _RECEIVER:
        from otlp import OTLPReceiver

        _RECEIVER.append(OTLPReceiver())
    return _RECEIVER[0]


def command(system: str, setup: Setup, port: int, work: Path) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    base, _, bind = system.partition("-bind")
    env = {**setup.env, "VLLM_CPU_OMP_THREADS_BIND": bind} if bind else dict(setup.env)
    if base.startswith("raylm"):
        model = {"name": setup.name, "source": setup.model_dir, "engine_args": setup.engine_args,
                 "env": {**env, **_MODEL_ENV.get(base, {})},
                 **setup.raylm_model, **_MODEL.get(base, {})}
        config = {"models": [model], "serve": {"port": port, "metrics_port": free_port(), **setup.raylm_serve,
                                               **_SERVICE.get(base, {})}}
        if base in TRACED:
            config["serve"]["otlp_endpoint"] = receiver().endpoint
        path = work / f"{system}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = {"raylm-base": {"PYTHONPATH": os.environ.get("RAYLM_BASE_SRC", "")},
                 "raylm-nice0": {"RAY_worker_niceness": "0"},
                 "raylm-engine15": {"RAYLM_ENGINE_NICENESS": "15"},
                 "raylm-spawn": {"RAYLM_ENGINE_CORE_START": "spawn"},
                 "raylm-cold": {"RAYLM_ENGINE_CORE_START": "spawn"},
                 "raylm-fork": {"RAYLM_ENGINE_CORE_START": "fork"},
                 "raylm-itl": {"RAYLM_VLLM_TOKEN_METRICS": "1"}}.get(base, {})
        if base == "raylm-pow2":
            return [py, "-c", _SERVE_ROUTER, "serve", str(path)], extra
        return [py, "-m", "raylm.cli", "serve", str(path)], extra
    if base in ("vllm", "vllm-uni"):
        server = ["-m", "vllm.entrypoints.openai.api_server"] if base == "vllm" else [str(HERE / "systems/vllm_uni.py")]
        return [py, *server, "--model", setup.model_dir, "--served-model-name", setup.name, "--host", "127.0.0.1",
                "--port", str(port), *vllm_flags(setup.engine_args)], env
    if base.startswith("ray-serve-llm"):
        direct = base == "ray-serve-llm-direct"
        mode = ({"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"} if direct
                else {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
        return [py, str(HERE / "systems/ray_serve_llm.py"), setup.model_dir, setup.name, str(port),
                "--engine-args", json.dumps(setup.engine_args), "--env", json.dumps(env),
                *(["--lora-config", json.dumps(setup.ray_llm_lora)] if setup.ray_llm_lora else [])], {
                    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **mode}
    if base == "naive":
        return [py, str(HERE / "systems/naive_pipeline.py"), setup.model_dir, setup.name, str(port)], {}
    raise ValueError(f"unknown system {system!r}")


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (raises psutil.NoSuchProcess if it is gone)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@contextmanager
def running(system: str, setup: Setup, work: Path, timeout_s: float = 600, probe: bool = True):
    """Start `system` serving `setup`; yield (OpenAI base URL, root PID) once it answers a completion (an
    embedding with `probe` False: setup is an embedding model)."""
    port = free_port()
    cmd, env = command(system, setup, port, work)
    log = open(work / f"{system}.log", "ab")
    proc = subprocess.Popen(cmd, env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=log,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{system} exited {proc.returncode}; see {log.name}")
            try:  # up means answering a completion: some servers list models before an engine is ready
                route, body = (("completions", {"model": setup.name, "prompt": "hi", "max_tokens": 1}) if probe
                               else ("embeddings", {"model": setup.name, "input": "hi"}))  # the base model
                auth = {"authorization": f"Bearer {setup.api_key}"} if setup.api_key else {}
                if httpx.post(f"{url}/{route}", json=body, headers=auth, timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{system} not up after {timeout_s}s; see {log.name}")
            time.sleep(1)
        yield url, proc.pid
    finally:
        tree = process_tree(proc.pid) if proc.poll() is None else []
        if tree:
            proc.terminate()  # each system shuts itself down on SIGTERM; stragglers are ended by PID
        end_processes(tree, grace_s=60)
        log.close()


def arguments(doc: str, rounds: int = 2) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as the help, `--rounds` and `--out` (benchmarks/results)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser


def cpu_flags() -> str:
    """The CPU features that decide dtype speed on this machine, for every printed figure."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"
