"""Config → Serve Application. The same function backs `raylm serve` and Serve YAML `import_path`.

One ingress deployment (HTTP on serve.host:port, auth, routing, retry) and one deployment per model. Serve's
own limits are set from each model's admission config, never left at Serve's defaults. The app has no
Serve route: the ingress replicas serve HTTP themselves, on the head node (the address users are given).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from ray.serve import Application

from raylm import _ray
from raylm._ray import HEAD_NODE_RESOURCE
from raylm.config import AppConfig, ModelConfig, load_config
from raylm.contract import APP_NAME, BATCH_NAME, INGRESS_NAME, LEDGER_NAME, deployment_name
from raylm.serve.batch.jobs import BatchDeployment
from raylm.serve.edge.access import load_access
from raylm.serve.edge.ingress import IngressDeployment
from raylm.serve.replica import warm
from raylm.serve.replica.server import ModelDeployment
from raylm.serve.usage.ledger import LedgerDeployment

HEALTH_CHECK_TIMEOUT_MARGIN_S = 20.0
INGRESS_MAX_ONGOING = 4096  # the ingress only forwards: the model replicas bound the work
LEDGER_MAX_ONGOING = 4096  # quota checks: each a dict lookup, never waits
AUTOSCALING_METRICS_INTERVAL_S = 1.0
REFUSAL_HEADROOM = 64  # calls a model replica takes beyond its queue, to refuse them itself (serve_options)
ROUTERS = {"default": "raylm.serve.edge.routing:SpreadRouter",  # Serve's power of two, bursts spread
           "prefix": "raylm.serve.edge.routing:PrefixAffinityRouter",
           "kv": "raylm.serve.edge.routing:KVEventRouter"}  # prefix, matched against the engines' KV events


def engine_args(model: ModelConfig) -> dict[str, Any]:
    """The user's engine arguments and the model's tool and reasoning fields, with room in the engine batch
    for every sequence admission runs. An engine of several workers runs them as Ray actors in the replica's
    placement group (placement())."""
    args = {**model.engine_args, **model.serving_args()}
    args.setdefault("max_num_seqs", model.admission.max_running + model.admission.burst)
    if world_size(model) > 1:
        args.setdefault("distributed_executor_backend", "ray")
    return args


def world_size(model: ModelConfig) -> int:
    """Engine workers per replica: vLLM's tensor × pipeline parallel sizes."""
    args = model.engine_args
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


def placement(model: ModelConfig) -> dict[str, Any]:
    """Ray Serve LLM's pattern for an engine of several workers: one placement group per replica with a
    bundle per worker, all on one node (STRICT_PACK: a TP group's all-reduce must not cross the network);
    with pipeline stages, packed as far as it goes (PACK: stages may span nodes, Ray places them).
    The replica shares the first bundle with worker 0 and reserves no GPU itself; `num_gpus` is the
    replica's total, split evenly over its workers. One worker: no group, the replica reserves it all."""
    world = world_size(model)
    if world == 1:
        return {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus}
    strategy = "PACK" if int(model.engine_args.get("pipeline_parallel_size", 1)) > 1 else "STRICT_PACK"
    if model.num_gpus:
        worker = {"GPU": model.num_gpus / world}
        bundles = [{"CPU": model.num_cpus, **worker}] + [dict(worker) for _ in range(world - 1)]
        return {"num_cpus": model.num_cpus, "num_gpus": 0.0, "placement_group_bundles": bundles,
                "placement_group_strategy": strategy}
    share = model.num_cpus / world
    return {"num_cpus": share, "num_gpus": 0.0, "placement_group_bundles": [{"CPU": share}] * world,
            "placement_group_strategy": strategy}


def serve_options(model: ModelConfig, drain_s: float = 30.0) -> dict[str, Any]:
    """Serve deployment options for one model, from its config; `drain_s`: serve.drain_s."""
    limits = model.admission
    options: dict[str, Any] = {
        # A replica leaving finishes its running requests this long (Serve's drain), then its streams are cut
        # and the ingress resumes them on another replica (resume.py).
        "graceful_shutdown_timeout_s": drain_s,
        # A replica takes its batch, its queue, as many again so that it (not Serve's FIFO) decides whom a
        # full queue refuses, and REFUSAL_HEADROOM calls it answers at once (bad input, a full queue).
        # Beyond that Serve queues at the caller, then refuses with 429. That caller queue also holds every
        # call its router has not assigned yet: sized to the queue alone, a burst of 16 malformed
        # requests overflowed it and valid ones got Serve's 429 (tests/chaos: 561 of 1,888).
        "max_ongoing_requests": limits.max_running + limits.burst + 2 * limits.max_queued + REFUSAL_HEADROOM,
        "max_queued_requests": limits.max_queued + REFUSAL_HEADROOM,
        "backpressure_config": {"status_code": 429, "retry_after_s": limits.retry_after_s},
        "health_check_period_s": model.health.period_s,
        "health_check_timeout_s": model.health.probe_timeout_s + HEALTH_CHECK_TIMEOUT_MARGIN_S,
    }
    where = placement(model)
    options["ray_actor_options"] = {"num_cpus": where.pop("num_cpus"), "num_gpus": where.pop("num_gpus"),
                                    "runtime_env": warm.runtime_env(model)}
    options.update(where)
    # Every handle to this model (the ingress's, the Batch API's) routes with it.
    options["request_router_config"] = {"request_router_class": ROUTERS[model.routing]}
    kwargs: dict[str, Any] = {"model_name": model.name} if model.routing == "kv" else {}
    if model.serves_adapters:  # the router keeps, per replica, the adapters it holds (routing.py)
        kwargs["adapter_capacity"] = model.lora_limits.held
    if kwargs:
        options["request_router_config"]["request_router_kwargs"] = kwargs
    scaling = model.autoscaling
    if scaling is None:
        options["num_replicas"] = model.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests or limits.max_running,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            # Each handle and replica reports to the autoscaler every second, not every 10 s: a model at zero
            # replicas scales up on a report that has seen its queue. Serve's push when a request finds no
            # replica sends the points recorded so far, all zero, so the decision came 9-10 s after the first
            # request in 7 of 10 cycles (benchmarks/scale_from_zero.py). Serve reads only this (deprecated)
            # field in 2.60; RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S, its named successor, not yet.
            "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S,
        }
    return options


def build_app(args: AppConfig | dict[str, Any] | None = None) -> Application:
    """Build the raylm Serve application.

    `args` is an AppConfig, or (from a Serve YAML) a dict holding either `config: <path to raylm YAML>`
    or the config tree itself.
    """
    if isinstance(args, AppConfig):
        config = args
    elif args and set(args) == {"config"}:
        config = load_config(Path(args["config"]))
    else:
        config = AppConfig.model_validate(args or {})
    handles = {}
    for m in config.models:
        served = m.model_copy(update={"engine_args": engine_args(m)})
        deployment = ModelDeployment.options(name=deployment_name(m.name), **serve_options(m, config.serve.drain_s))
        version = _version(served, config.serve.cache_dir, config.serve.otlp_endpoint,
                           scaling=("replicas", "autoscaling"))
        handles[m.name] = _ray.versioned(deployment, version).bind(
            served, str(config.serve.cache_dir), otlp_endpoint=config.serve.otlp_endpoint)
    serve_config = config.serve
    access = load_access(serve_config)
    # The ingress and BatchJobs get serve.* without the keys: those reach the ingress hashed, in `access`.
    edge = serve_config.model_copy(update={"api_keys": (),
                                           "batch_dir": serve_config.batch_dir or serve_config.cache_dir / "batches"})
    # One BatchJobs replica, on the head node with the ingress: both read and write batch_dir there.
    batches = _ray.versioned(BatchDeployment.options(
        name=BATCH_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    ), _version(config.models, access.tenants, edge)).bind(config.models, dict(access.tenants), edge)
    # One Ledger, on the head node: its quotas hold for every ingress replica; its SQLite file and access log
    # are there (usage/ledger.py).
    key_tenants = tuple(sorted(set(access.key_hashes.values())))
    ledger = _ray.versioned(LedgerDeployment.options(
        name=LEDGER_NAME, num_replicas=1, max_ongoing_requests=LEDGER_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    ), _version(edge, key_tenants)).bind(edge, key_tenants) if serve_config.usage.enabled else None
    return _ray.versioned(IngressDeployment.options(
        name=INGRESS_NAME, num_replicas=serve_config.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
        # Its successor first takes the port, then its own requests finish (ingress.py's __del__), the ones
        # waiting for a model's cold start among them.
        graceful_shutdown_timeout_s=2 * serve_config.drain_s + serve_config.cold_start_timeout_s + 5,
        ray_actor_options={"num_cpus": serve_config.ingress_num_cpus, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    ), _version(config.models, access, edge, scaling=("replicas",))).bind(config.models, handles, access, edge,
                                                                          batches, ledger)


def _version(*parts: Any, scaling: tuple[str, ...] = ()) -> str:
    """A deployment's version (`_ray.versioned`): a digest of what its replicas are built from, so that a
    redeploy replaces only the deployments whose config changed and scales the others in place. `scaling`:
    the ModelConfig fields its replicas never read (a model's own replicas: replicas and autoscaling; the
    ingress: replicas), left out. (The salt secret in `access` is not in its repr.)"""
    def plain(part: Any) -> Any:
        if isinstance(part, BaseModel):
            return part.model_dump(mode="json", exclude=set(scaling) if isinstance(part, ModelConfig) else None)
        if isinstance(part, (tuple, list)):
            return [plain(p) for p in part]
        if isinstance(part, Mapping):
            return {str(k): plain(v) for k, v in part.items()}
        return repr(part)

    return hashlib.sha256(json.dumps(plain(parts), sort_keys=True).encode()).hexdigest()[:16]


def serve_config_file(config: AppConfig) -> dict[str, Any]:
    """The Ray Serve config file (`serve deploy`, KubeRay's `serveConfigV2`) that runs `config` on any Ray
    cluster: one application whose args are the raylm config tree (what differs from the defaults).

    API keys are never written into it (they would travel in a manifest): name a file on the cluster in
    `serve.api_keys_file`, e.g. a mounted Kubernetes Secret. `serve.address` belongs to `raylm serve`."""
    if config.serve.api_keys:
        raise ValueError("raylm build does not write API keys into a deploy file: put them in a file on the "
                         "cluster (a mounted Kubernetes Secret) and name it in serve.api_keys_file")
    tree = config.model_dump(mode="json", exclude_defaults=True, exclude={"serve": {"address"}})
    if not tree.get("serve"):
        tree.pop("serve", None)
    return {"proxy_location": "Disabled",  # the ingress serves HTTP itself (module docstring)
            "applications": [{"name": APP_NAME, "route_prefix": None, "import_path": "raylm.serve:build_app",
                              "args": tree}]}
