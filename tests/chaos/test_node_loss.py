"""Node loss: a 2-node Ray cluster on 127.0.0.1 (two raylets started here); Serve spreads the two replicas
over both nodes, and the head has room for both. The worker node is removed under traffic: Serve
reschedules its replica on the head while requests go to the surviving replica.
"""

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from ray import serve

from helpers import TINY_ENGINE_ARGS, free_port, replica_processes
from scenario import ENV

from raylm.bench.load import closed_loop, send
from raylm.config import AppConfig, ModelConfig
from raylm.contract import APP_NAME
from raylm.serve.control.service import end_processes


def _ray(*args: str) -> None:
    # A joining node does not pick up the head's token auth by itself (Ray 2.60): say so.
    subprocess.run([str(Path(sys.executable).with_name("ray")), "start", *args, "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats"], check=True, timeout=120, capture_output=True,
                   env={**os.environ, "RAY_AUTH_MODE": "token"})


def _raylets() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}


@pytest.fixture
def two_nodes():
    """`ray start` a head (room for both replicas) and a worker node; yields (GCS port, worker raylet).

    Only processes started here are ended: those under this cluster's temp dir, and the worker's raylet tree.
    """
    port = free_port()
    temp_dir = Path("/tmp") / f"raylm-nodes-{os.getpid()}"
    worker = None
    try:
        _ray("--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false", f"--temp-dir={temp_dir}")
        before = _raylets()
        _ray(f"--address=127.0.0.1:{port}", "--num-cpus=1")
        (worker_pid,) = _raylets() - before
        worker = psutil.Process(worker_pid)
        yield port, worker
    finally:
        if ray.is_initialized():  # never let serve.shutdown() look for a cluster by itself
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        roots = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
        ours = [*roots, *([worker] if worker else [])]
        for root in list(ours):  # with their agents and workers, whose command lines do not name the dir
            with contextlib.suppress(psutil.Error):
                ours += root.children(recursive=True)
        end_processes(ours, grace_s=0, term_s=5)


def _replicas() -> list[psutil.Process]:
    return replica_processes("tiny", psutil.process_iter())  # `ray start` daemons: not our children


@pytest.mark.slow  # ~150 s (two `ray start` nodes, a 2-replica service, a replacement): `make test-slow`
def test_losing_a_node_reschedules_its_replica_while_the_other_serves(two_nodes, tiny_model):
    from raylm.serve.control.service import start

    port, worker = two_nodes
    config = AppConfig(
        models=(ModelConfig(name="tiny", source=str(tiny_model), replicas=2, num_cpus=1,
                            engine_args=TINY_ENGINE_ARGS, env=ENV),),
        serve={"port": free_port(), "address": f"127.0.0.1:{port}"},
    )
    service = start(config)
    on_worker = {p.pid for p in worker.children(recursive=True)}
    assert len(_replicas()) == 2 and len([p for p in _replicas() if p.pid in on_worker]) == 1
    status = lambda: serve.status().applications[APP_NAME].deployments["model-tiny"].replica_states  # noqa: E731
    removed = {}

    def remove_worker():
        time.sleep(3)
        removed["at"] = time.monotonic()
        for proc in [worker, *worker.children(recursive=True)]:  # the node vanishes: no goodbye
            with contextlib.suppress(psutil.Error):
                proc.kill()

    async def traffic():
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 16, "temperature": 0}
        async with httpx.AsyncClient(timeout=60) as client:
            loss = asyncio.get_running_loop().run_in_executor(None, remove_worker)
            result = await closed_loop(lambda i: send(client, f"{service.url}/v1/completions", body), 2, 10_000, 20)
            await loss
            return result

    result = asyncio.run(traffic())
    deadline = removed["at"] + 90
    while time.monotonic() < deadline and status().get("RUNNING", 0) < 2:
        time.sleep(1)
    back_s = time.monotonic() - removed["at"]
    survivors = _replicas()
    print(f"\nCHAOS node loss: requests={len(result.results)}, failed={result.errors}, "
          f"full_replicas_after_s={back_s:.3g}", flush=True)
    assert result.errors == 0
    assert status().get("RUNNING", 0) == 2 and back_s <= 60
    assert len(survivors) == 2 and not on_worker & {p.pid for p in survivors}
    service.stop()


@pytest.mark.slow  # ~3 min (two `ray start` nodes, a 2-replica service, a migration): `make test-slow`
def test_draining_a_node_moves_its_replica_and_drops_nothing(two_nodes, tiny_model):
    """`ray drain-node` (a preemption notice with a deadline) under steady load, streamed and not: Serve starts
    a replacement on the head, then stops the drained node's replica through the graceful path (it finishes
    its requests for serve.drain_s, then its streams go on elsewhere): no request fails, no stream is cut."""
    from scenario import report, steady, tally

    from raylm.serve.control.service import start

    port, worker = two_nodes
    config = AppConfig(
        models=(ModelConfig(name="tiny", source=str(tiny_model), replicas=2, num_cpus=1,
                            engine_args=TINY_ENGINE_ARGS, env=ENV),),
        serve={"port": free_port(), "address": f"127.0.0.1:{port}", "drain_s": 20},
    )
    service = start(config)
    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU") == 1]
    on_worker = {p.pid for p in worker.children(recursive=True)}
    assert len([p for p in _replicas() if p.pid in on_worker]) == 1
    status = lambda: serve.status().applications[APP_NAME].deployments["model-tiny"].replica_states  # noqa: E731
    with steady(service.url, "tiny", {}) as results:
        time.sleep(5)
        began = time.monotonic()
        subprocess.run([str(Path(sys.executable).with_name("ray")), "drain-node", f"--address=127.0.0.1:{port}",
                        f"--node-id={node}", "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test",
                        "--deadline-remaining-seconds=120"], check=True, timeout=60, capture_output=True)
        deadline = began + 150
        while time.monotonic() < deadline and (status().get("RUNNING", 0) < 2 or
                                               any(p.pid in on_worker for p in _replicas())):
            time.sleep(1)
        moved_s = time.monotonic() - began
        time.sleep(5)
    seen = tally(results)
    failed = seen["failed"]
    report("drain-node", requests=len(results), streams=seen["streams"], failed=len(failed), moved_s=moved_s,
           failures=seen["failures"])
    assert len(results) > 50 and not failed, failed[:3]
    assert status().get("RUNNING", 0) == 2 and not any(p.pid in on_worker for p in _replicas())
    service.stop()
