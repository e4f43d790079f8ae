"""Warm workers: Ray worker processes that imported torch, vLLM and the replica's code before a replica needs them.

A new replica's process spends its first ~15 s (2 cores) importing Ray, Serve, torch and vLLM before its engine
starts (docs/first-run.md). The raylet gives an actor an idle worker whose runtime env is the actor's, the very
string, instead of starting a process; raylm asks it to start such workers ahead of need (its PrestartWorkers
RPC: `_ray.prestart_workers`), and each runs `preimport` as it starts (Ray's setup-hook variable in the runtime
env, which every replica of the model has: one that finds no warm worker imports the same way in its own).

    raylm serve ── Ray up ──► one warm worker per replica each model starts with: their imports overlap
                              Serve's own start; once every model is up, the spares (`settle`)
    replica up ─────────────► `spares` warm workers on its node for the model's next replica (scale-up, scale
                              from zero, one that replaces a dead replica): `ensure_spares`

A warm worker holds ~0.6 GiB (torch and vLLM imported) and no CPU while it waits. `warm_workers` in a model's
config sets its spares (default: 1 for a model that autoscales, 0 otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from raylm import _ray, hardware
from raylm.config import ModelConfig
from raylm.engine.vllm import START_ENV

logger = logging.getLogger("raylm.serve")

HOOK = f"{__name__}.preimport"
MODEL_ENV = "RAYLM_MODEL"
KEY_ENV = "RAYLM_WARM_KEY"
PREIMPORT_ENV = "RAYLM_PREIMPORT"  # "serve": Ray, Serve and raylm only (a GPU model's replica)
KEEP_ALIVE_S = 7 * 24 * 3600  # the raylet ends idle workers beyond num_workers_soft_limit: never these before
SETTLE_TIMEOUT_S = 120.0
preimported: tuple[float, float] | None = None  # this process's preimport, when it ran: (seconds, end time)


def runtime_env(model: ModelConfig) -> dict[str, Any]:
    """The runtime env of the model's replicas (and of its warm workers: the same string). On a CPU the
    replica's EngineCore comes from a forkserver (engine/vllm.py engine_core_by_fork, unless the model's env or
    raylm's own says otherwise); with GPUs it is spawned, as vLLM does."""
    env = hardware.engine_env(model.env, model.source)
    if model.num_gpus:
        env.setdefault(START_ENV, "spawn")
        # torch and vLLM only once Ray gave the replica its GPUs: an import that initialises CUDA reads
        # CUDA_VISIBLE_DEVICES then, and never again
        env[PREIMPORT_ENV] = "serve"
    # The model's name keeps its warm workers its own: two models with the same environment would take each
    # other's (the raylet matches runtime envs), and one without spares would leave the other without any.
    env_vars = {**env, MODEL_ENV: model.name, _ray.load("SETUP_HOOK_ENV"): HOOK}
    # ...and the key of this very environment names its warm workers' marks: a spare started before the
    # model's env changed (a reload) is not the new replicas', and is not counted as theirs.
    key = hashlib.sha256(json.dumps(env_vars, sort_keys=True).encode()).hexdigest()[:16]
    return {"env_vars": {**env_vars, KEY_ENV: key}}


def key_of(model: ModelConfig) -> str:
    return runtime_env(model)["env_vars"][KEY_ENV]


def preimport() -> None:
    """The modules a replica imports before its engine starts, and the forkserver its EngineCore will come
    from (started first: it imports beside this process). Never raises: a worker whose setup hook fails exits,
    and the replica's own import then says what is wrong, as it did before warm workers."""
    global preimported
    started = time.monotonic()
    with contextlib.suppress(Exception):
        _mark("importing")
    try:
        from ray import serve  # noqa: F401

        from raylm import _vllm
        from raylm.engine.vllm import start_forkserver

        if os.environ.get(PREIMPORT_ENV) != "serve":
            start_forkserver()
            for module, _, _ in _vllm.NAMES.values():  # torch, by vLLM's
                importlib.import_module(module)
    except Exception:
        logger.warning("a warm worker's imports failed; its replica imports again", exc_info=True)
    # What it imported leaves the collector's reach now: the replica's start then makes no full collection
    # that walks torch and vLLM (~0.5 s each; the replica freezes again once up: server.py).
    _ray.freeze_heap()
    preimported = (time.monotonic() - started, time.time())
    with contextlib.suppress(Exception):
        _mark("warm")


def waited_since(entered: float) -> float | None:
    """How long this process waited as a warm worker before its replica came (`entered`: the replica's
    start), or None if it did not: a worker started for the replica, or one given to it while importing."""
    if preimported is None or entered - preimported[1] < 1.0:
        return None
    return entered - preimported[1]


def ensure_spares_later(model: ModelConfig) -> None:
    """`ensure_spares` on a thread, from a replica that is up."""
    import ray

    def ensure() -> None:
        try:
            started = ensure_spares(model, ray.get_runtime_context().get_runtime_env_string())
        except Exception:
            logger.warning("%s: no warm worker started for its next replica", model.name, exc_info=True)
            return
        if started:
            logger.info("%s: %d warm worker(s) started for its next replica", model.name, started)

    threading.Thread(target=ensure, name="raylm-warm", daemon=True).start()


def marks_dir() -> Path:
    """Where this node's warm workers say they exist: one file per worker, `<key of its runtime env>.<pid>`,
    holding `importing` or `warm` (the session's folder: a new cluster starts empty). The marks, not the
    processes' environments, say whose a worker is: Ray's process title may take the room of a worker's
    environment, which then reads empty."""
    return Path(_ray.load("global_node").get_session_dir_path()) / "raylm-warm"


def _mark(state: str) -> None:
    folder = marks_dir()
    folder.mkdir(exist_ok=True)
    name = f"{os.environ.get(KEY_ENV, 'none')}.{os.getpid()}"
    (folder / f".{name}").write_text(state)
    (folder / f".{name}").replace(folder / name)


def idle(key: str | None = None, folder: Path | None = None) -> dict[int, tuple[str, str]]:
    """This node's warm workers that no replica took yet, of one runtime env (`key_of`) or all: pid → (key,
    `importing` or `warm`). Marks of workers that are gone or became a replica are removed."""
    folder, found = folder or marks_dir(), {}
    title = _ray.load("IDLE_TITLE")
    for path in folder.glob(f"{key or '*'}.*") if folder.is_dir() else ():
        mark_key, pid = path.name.rsplit(".", 1)
        try:
            still_idle = psutil.Process(int(pid)).cmdline()[:1] == [title]
        except (psutil.Error, ValueError):
            still_idle = False
        if still_idle:
            found[int(pid)] = (mark_key, path.read_text())
        else:
            path.unlink(missing_ok=True)
    return found


def ensure_spares(model: ModelConfig, runtime_env_string: str) -> int:
    """Start warm workers on this node until the model has `spares` idle ones here; returns how many it
    started. `runtime_env_string`: the replica's own (ray.get_runtime_context), so that they match it exactly."""
    missing = model.spares - len(idle(key_of(model)))
    if missing > 0:
        _ray.prestart_workers(runtime_env_string, missing, KEEP_ALIVE_S)
    return max(0, missing)


def prestart_for(models: tuple[ModelConfig, ...], counts: dict[str, int]) -> None:
    """On a cluster raylm started (one node): `counts[name]` warm workers for each model."""
    for model in models:
        if counts.get(model.name, 0) > 0:
            try:
                _ray.prestart_workers(_ray.runtime_env_string(runtime_env(model)), counts[model.name], KEEP_ALIVE_S)
            except Exception as exc:  # an optimisation: the replicas start without (grpc errors, a Ray upgrade)
                logger.warning("%s: no warm worker started (%s)", model.name, exc)


def end(models: tuple[ModelConfig, ...]) -> None:
    """End this node's idle warm workers of these models (raylm leaving a cluster it did not start)."""
    _terminate([pid for model in models for pid in idle(key_of(model))])


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).terminate()


def settle(models: tuple[ModelConfig, ...], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """On a cluster raylm started, once every model is up (or a new config rolled out): end the idle warm
    workers beyond each model's spares (a replica's request can reach the raylet before its warm worker
    registered, and the raylet then starts another process for it) and those of no model now (a config
    changed), start the spares a model lacks (a model at zero replicas has none yet), and wait until each
    has finished its imports: ready then means nothing still loads."""
    keys = {key_of(m): m.spares for m in models}
    extra = [pid for key, spares in keys.items() for pid in sorted(idle(key))[spares:]]
    _terminate(extra + [pid for pid, (key, _) in idle().items() if key not in keys])
    prestart_for(models, {m.name: m.spares - len(idle(key_of(m))) for m in models})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {key: idle(key) for key in keys}
        if all(len(found[key]) >= spares and all(s == "warm" for _, s in found[key].values())
               for key, spares in keys.items()):
            return
        time.sleep(0.5)
