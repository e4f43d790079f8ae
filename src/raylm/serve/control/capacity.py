"""What a config asks of the cluster, checked before deploying: an impossible config fails in seconds with
the reason, instead of waiting `ready_timeout_s` for replicas Ray can never place.

    per model   replicas at deploy time (autoscaling: initial, else min) × (num_cpus, num_gpus, memory)
    memory      weights (the files' size) + KV cache (VLLM_CPU_KVCACHE_SPACE, on a CPU) + ~1.5 GiB of runtime,
                and ~0.6 GiB per warm worker (`warm_workers`: serve/replica/warm.py)
    ingress     ingress_replicas × ingress_num_cpus
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raylm.config import AppConfig, ModelConfig

GiB = 2**30
RUNTIME_BYTES = int(1.5 * GiB)  # a replica's Python, torch and vLLM, measured idle: 1.2-1.6 GiB RSS
WARM_WORKER_BYTES = int(0.6 * GiB)  # an idle worker that imported torch and vLLM: 571 MiB RSS
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


@dataclass(frozen=True)
class Demand:
    cpus: float
    gpus: float
    memory: int
    lines: tuple[str, ...]  # one per model, for the message


def replicas_at_start(model: ModelConfig) -> int:
    scaling = model.autoscaling
    if scaling is None:
        return model.replicas
    return scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas


def weights_bytes(folder: str) -> int:
    path = Path(folder)
    if not path.is_dir():
        return 0  # an HF id: its size is not known here
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))


def kv_bytes_per_token(hf_config: dict, dtype_bytes: int = 2) -> int:
    """KV cache of one token, all layers: keys and values of every KV head (GQA: fewer than query heads)."""
    text = hf_config.get("text_config", hf_config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def gpu_plan(model: ModelConfig, folder: str, weight_bytes: int) -> str | None:
    """Per GPU of one replica: its share of the weights and of each token's KV cache (tensor parallel splits
    KV heads, pipeline parallel splits layers), for the memory arithmetic raylm prints with a GPU config."""
    config_file = Path(folder) / "config.json"
    if not model.num_gpus or not config_file.is_file():
        return None
    import json

    from raylm.serve.control.builder import world_size

    world = world_size(model)
    per_token = kv_bytes_per_token(json.loads(config_file.read_text())) / world
    budget = float(model.engine_args.get("gpu_memory_utilization", 0.9))
    return (f"{model.name}: per GPU ({world} per replica) weights {weight_bytes / world / GiB:.1f} GiB, KV cache "
            f"{per_token / 1024:.0f} KiB per token; vLLM takes {budget:.0%} of each GPU and gives the KV cache "
            f"what weights and activations leave")


def demand(config: AppConfig, weights: Callable[[ModelConfig], int]) -> Demand:
    cpus = config.serve.ingress_replicas * config.serve.ingress_num_cpus
    gpus, memory, lines = 0.0, 0, []
    for model in config.models:
        n = replicas_at_start(model)
        kv = int(float(model.env.get("VLLM_CPU_KVCACHE_SPACE", "0") or 0) * GiB) if not model.num_gpus else 0
        each = weights(model) + kv + RUNTIME_BYTES
        cpus, gpus = cpus + n * model.num_cpus, gpus + n * model.num_gpus
        memory += n * each + model.spares * WARM_WORKER_BYTES
        lines.append(f"{model.name}: {n} × ({model.num_cpus:g} CPU, {model.num_gpus:g} GPU, "
                     f"{each / GiB:.1f} GiB)" + (f" + {model.spares} warm worker(s)" if model.spares else ""))
    lines.append(f"ingress: {config.serve.ingress_replicas} × {config.serve.ingress_num_cpus:g} CPU")
    return Demand(cpus, gpus, memory, tuple(lines))


def shortfalls(need: Demand, cluster: dict[str, float], free_memory: int | None) -> list[str]:
    """What the cluster lacks for this demand (empty: it fits)."""
    problems = []
    for key, wanted in (("CPU", need.cpus), ("GPU", need.gpus)):
        have = cluster.get(key, 0.0)
        if wanted > have + 1e-9:
            problems.append(f"the config needs {wanted:g} {key}s at start, the cluster has {have:g}")
    if free_memory is not None and need.memory > free_memory:
        problems.append(f"the config needs about {need.memory / GiB:.1f} GiB of memory at start, "
                        f"{free_memory / GiB:.1f} GiB is free")
    if problems:
        problems.append("asked for: " + "; ".join(need.lines))
        problems.append("lower `replicas` or `num_cpus`/`num_gpus` (or VLLM_CPU_KVCACHE_SPACE), or add nodes")
    return problems
