"""The one door to Ray's internals: every private or internal name raylm uses, each with the public API it
lacks. Nothing else in raylm imports `ray._private`, `ray.serve._private` or `ray.experimental`, or passes
ray.init a private argument; `tests/unit/test_internals.py` loads every name here, so a Ray upgrade that
moves one fails there, by name, instead of at run time in whichever module touched it first.

Imported lazily (`load`): importing raylm never imports more of Ray than its callers do.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# name: (module, attribute, the public API that is missing)
NAMES: dict[str, tuple[str, str, str]] = {
    "internal_kv": ("ray.experimental.internal_kv", "_internal_kv_put",
                    "a small cluster-wide key-value store (replicas publish their state for `raylm status`)"),
    "internal_kv_get": ("ray.experimental.internal_kv", "_internal_kv_get", "the same store: read"),
    "internal_kv_del": ("ray.experimental.internal_kv", "_internal_kv_del", "the same store: delete"),
    "internal_kv_list": ("ray.experimental.internal_kv", "_internal_kv_list", "the same store: list by prefix"),
    "SERVE_CONTROLLER_NAME": ("ray.serve._private.constants", "SERVE_CONTROLLER_NAME",
                              "whether Serve runs on the cluster (serve.status() answers the same for none)"),
    "SERVE_NAMESPACE": ("ray.serve._private.constants", "SERVE_NAMESPACE", "the same"),
    "serve_client": ("ray.serve.context", "_get_global_client",
                     "an application's status without serve.status()'s cost (serve_app)"),
    "global_node": ("ray._private.worker", "_global_node",
                    "the session's log folder (ray.get_runtime_context() does not say where logs go)"),
    "token_auth": ("ray._private.authentication.authentication_token_setup",
                   "maybe_enable_token_auth_if_token_available",
                   "ray.init(address='host:port') loading ~/.ray/auth_token as address='auto' does"),
    "fetch_future_result": ("ray.serve.handle", "DeploymentResponseGenerator._fetch_future_result_async",
                            "a handle call's 'assigned to a replica' event (only its result can be awaited)"),
    "RequestMetadata": ("ray.serve._private.common", "RequestMetadata",
                        "building a PendingRequest to test a custom RequestRouter (tests only)"),
    "DeploymentID": ("ray.serve._private.common", "DeploymentID", "the same (tests only)"),
    "DeploymentHandleSource": ("ray.serve._private.common", "DeploymentHandleSource", "the same (tests only)"),
    "AGENT_DASHBOARD": ("ray._private.ray_constants", "AGENT_PROCESS_TYPE_DASHBOARD_AGENT",
                        "the process title of a node's agents (to renice them: renice_agents)"),
    "AGENT_RUNTIME_ENV": ("ray._private.ray_constants", "AGENT_PROCESS_TYPE_RUNTIME_ENV_AGENT", "the same"),
    "setproctitle": ("ray._raylet", "setproctitle",
                     "renaming a process forked from a Ray worker: the setproctitle package cannot rewrite a "
                     "command line Ray's own has moved (engine/vllm.py engine_core_by_fork)"),
    "SETUP_HOOK_ENV": ("ray._private.ray_constants", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR",
                       "a function a worker runs when it starts, before its first task, for an actor's runtime env "
                       "(runtime_env's worker_process_setup_hook is read only at ray.init: serve/replica/warm.py)"),
    "IDLE_TITLE": ("ray._private.ray_constants", "WORKER_PROCESS_TYPE_IDLE_WORKER",
                   "the process title of an idle worker (warm workers are counted by it)"),
    "init_grpc_channel": ("ray._private.grpc_utils", "init_grpc_channel",
                          "a gRPC channel to a raylet with Ray's auth token (and TLS): prestart_workers"),
    "NodeManagerServiceStub": ("ray.core.generated.node_manager_pb2_grpc", "NodeManagerServiceStub",
                               "asking a raylet to start workers ahead of need (its PrestartWorkers RPC; Ray's "
                               "Python API has no call for it): prestart_workers"),
    "PrestartWorkersRequest": ("ray.core.generated.node_manager_pb2", "PrestartWorkersRequest", "the same"),
    "RuntimeEnvInfo": ("ray.core.generated.runtime_environment_pb2", "RuntimeEnvInfo", "the same"),
    "Language": ("ray.core.generated.common_pb2", "Language", "the same"),
}
# ray.init's private keyword arguments a local raylm cluster is started with (init_local), and why.
INIT_ARGUMENTS = {
    "_node_ip_address": "binding the node to loopback (no public argument)",
    "_metrics_export_port": "the Prometheus port (ray start has --metrics-export-port; ray.init does not)",
    "_system_config": "keeping idle workers (num_workers_soft_limit; ray start has --system-config)",
}
# A local cluster raylm starts keeps idle workers: Ray keeps one idle task worker per CPU and ends the others
# within a second. On a 2-core node a batch job's read and write tasks then started a new Python worker for
# each block, ~1 s of CPU each, during which the engines' OpenMP steps stalled: interactive TTFT p99 beside a
# batch 731 → 318 ms with these kept.
LOCAL_RAY_CONFIG = {"num_workers_soft_limit": 8}
# Ray's resource label of the head node; documented for scheduling on the head, but not an API constant.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# The logger that warns at every start that token auth is on (raylm's own cluster always has it).
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def load(name: str) -> Any:
    """The name's current value (not cached: some are module globals that change when Ray starts)."""
    module, path, _ = NAMES[name]
    value = importlib.import_module(module)
    for attribute in path.split("."):
        value = getattr(value, attribute)
    return value


def init_local(num_cpus: float | None, metrics_port: int | None, system_config: dict[str, Any],
               verbose: bool = False, **options: Any) -> None:
    """A fresh local cluster on loopback (address="local": a bare init() may attach to a stale one)."""
    import ray

    private: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "_system_config": system_config}
    if metrics_port is not None:
        private["_metrics_export_port"] = metrics_port
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=verbose, **options, **private)


def serve_controller_running() -> bool:
    import ray

    try:
        ray.get_actor(load("SERVE_CONTROLLER_NAME"), namespace=load("SERVE_NAMESPACE"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class DeploymentState:
    status: str  # Serve's DeploymentStatus value: HEALTHY, UPDATING, UNHEALTHY, ...
    message: str
    replica_states: dict[str, int]  # STARTING, RUNNING, ... → replicas


@dataclass(frozen=True)
class AppState:
    status: str  # Serve's ApplicationStatus value: RUNNING, DEPLOYING, DEPLOY_FAILED, DELETING, ...
    message: str
    deployments: dict[str, DeploymentState]


def serve_app(app_name: str) -> AppState | None:
    """One application's part of serve.status() (None: no such application, or no Serve), read from the
    controller's details as they come. serve.status() parses them into pydantic models, where each deployment's
    RequestRouterConfig pickles its router class by value again: ~35 ms of CPU per deployment with raylm's
    routers, 6.4 s of `raylm serve`'s CPU while the bundled models start (it asks twice a second)."""
    client = load("serve_client")(raise_if_no_controller_running=False)
    return None if client is None else app_state(client.get_serve_details(), app_name)


def app_state(details: dict[str, Any], app_name: str) -> AppState | None:
    """The application's state in the controller's details (`get_serve_instance_details`: Serve's enums, or
    their values)."""
    app = details.get("applications", {}).get(app_name)
    if app is None:
        return None
    return AppState(_value(app.get("status")), app.get("message") or "", {
        name: DeploymentState(_value(d.get("status")), d.get("message") or "",
                              dict(Counter(_value(r.get("state")) for r in d.get("replicas", []))))
        for name, d in app.get("deployments", {}).items()})


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


def session_log_dir() -> str:
    """Where every Ray process of this session writes its output (replicas, engines, Serve)."""
    return str(Path(load("global_node").get_session_dir_path()) / "logs")


def renice_agents(among: list[Any] | None = None) -> list[int]:
    """Put the Ray agents this process started at the niceness of Ray's workers (15; RAY_worker_niceness).

    The raylet starts them at 0, above every worker. The dashboard agent replays each histogram observation it
    is sent, one by one (open_telemetry_metric_recorder.py; vLLM's inter-token histogram has one per token):
    under a flood, a burst of a core every report, at a weight 28× a worker's. Ingress and replica event
    loops then stalled 25-70 ms at every report (the fairness test's light-tenant tail). At the workers'
    niceness the bursts share the core. Linux's nice is per thread (and inherited by new ones): each thread.
    Returns the agents' pids."""
    import psutil

    titles = ([load("AGENT_DASHBOARD")], [load("AGENT_RUNTIME_ENV")])
    found = []
    for proc in psutil.Process().children(recursive=True) if among is None else among:
        try:
            if proc.cmdline()[:1] in titles:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return [pid for pid in found if renice(pid, worker_niceness())]


def worker_niceness() -> int:
    return int(os.environ.get("RAY_worker_niceness", "15"))


ENGINE_NICENESS_STEP = 4  # the engine's processes below their replica: weight 36 against 15 at nice 15 → 19


def renice_engine() -> list[int]:
    """Put this replica's child processes (vLLM's EngineCore, and its workers in the `mp` layout) 4 nice levels
    below the replica (15 → 19 under Ray's default; `RAYLM_ENGINE_NICENESS` in a model's env sets it).

    On cores the engine shares with the serving path, the engine is the one that always has work: at the same
    niceness a replica or ingress that wakes (a new request to take, a token to relay) waits behind an engine
    step. Below it, they run first, and the engine takes the rest of the cores (fairness test, issue 27).
    Returns the pids it reniced."""
    import psutil

    own = os.getpriority(os.PRIO_PROCESS, 0)
    niceness = int(os.environ.get("RAYLM_ENGINE_NICENESS", min(19, own + ENGINE_NICENESS_STEP)))
    return [p.pid for p in psutil.Process().children(recursive=True) if renice(p.pid, niceness)]


def renice(pid: int, niceness: int) -> bool:
    """Every thread of process `pid` at `niceness` at least (Linux's nice is per thread, and inherited by the
    threads made later); never raised above its own, which needs a right a worker lacks. False if it is gone."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, int(tid), max(niceness, os.getpriority(os.PRIO_PROCESS, int(tid))))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return True


def runtime_env_string(runtime_env: dict[str, Any]) -> str:
    """An actor's runtime env as Ray passes it to the raylet, whose worker pool gives the actor only an idle
    worker started with this very string (it compares their hashes). Serve's controller makes it so for a
    replica (json.dumps, sorted keys); the slow chaos test of a cold start checks that a replica is given the
    warm worker started with it."""
    return json.dumps(runtime_env, sort_keys=True)


def prestart_workers(runtime_env: str, count: int, keep_alive_s: int) -> None:
    """Ask this node's raylet to start `count` idle Python workers with this runtime env (`runtime_env_string`),
    kept at least `keep_alive_s` while idle: an actor with that runtime env is then given one of them instead of
    a new process. They belong to no job until one is given a task. The raylet answers at once; a worker it
    fails to start is only in its log."""
    import ray
    from ray.runtime_env import RuntimeEnvConfig

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    info = load("RuntimeEnvInfo")(serialized_runtime_env=runtime_env)
    info.runtime_env_config.CopyFrom(RuntimeEnvConfig.default_config().build_proto_runtime_env_config())
    request = load("PrestartWorkersRequest")(language=load("Language").Value("PYTHON"), runtime_env_info=info,
                                             keep_alive_duration_secs=keep_alive_s, num_workers=count)
    channel = load("init_grpc_channel")(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        load("NodeManagerServiceStub")(channel).PrestartWorkers(request, timeout=10)
    finally:
        channel.close()


def versioned(deployment: Any, version: str) -> Any:
    """`deployment` with a version of raylm's choosing. Serve removed `version` from `Deployment.options()`
    ("Serve manages deployment versions internally") and gives a deployment run from Python a random one at
    each `serve.run`, so every redeploy replaced every replica, a changed replica count too. With the same
    version Serve applies a changed replica count (and its other options) in place; another rolls them."""
    return deployment.options(version=version, _internal=True)


def freeze_heap() -> None:
    """Move everything a worker made while starting out of the garbage collector's reach, as `vllm serve` does
    once it is up (vllm.utils.gc_utils.freeze_gc_heap). Otherwise each full collection walks the whole heap:
    measured here 475 ms in a process that imported vLLM, 143 ms in the ingress's; under a flood one came
    every minute or two and stalled every request in the process (the fairness test's light-tenant tail)."""
    import gc

    gc.collect()
    gc.freeze()


def use_local_auth_token() -> None:
    """Ray 2.60 loads ~/.ray/auth_token for address="auto" but not for an explicit host:port; without it a
    token-auth cluster (the default) refuses us. Same rule as auto: use the token if one exists."""
    try:
        enable = load("token_auth")
    except (ImportError, AttributeError):
        return
    enable(warn_if_disabled=False)


async def assigned(replies: Any) -> None:
    """Returns once Serve's router has given a handle call (a DeploymentResponseGenerator) to a replica."""
    await load("fetch_future_result")(replies)


def kv_put(key: str, value: str) -> None:
    load("internal_kv")(key, value, overwrite=True)


def kv_get(key: str | bytes) -> bytes | None:
    return load("internal_kv_get")(key)


def kv_del(key: str) -> None:
    load("internal_kv_del")(key)


def kv_list(prefix: str) -> list[bytes]:
    return load("internal_kv_list")(prefix)
