"""Every Ray and vLLM internal raylm uses loads: an upgrade that moves one fails here, by name."""

import importlib
import inspect
import os
import sys
import time

import pytest
import ray

from raylm import _ray, _vllm


@pytest.mark.parametrize("name", sorted(_ray.NAMES))
def test_ray_internal(name):
    module, path, _ = _ray.NAMES[name]
    value = importlib.import_module(module)
    for attribute in path.split("."):  # some are module globals, None until Ray starts: present is enough
        assert hasattr(value, attribute), f"{module}.{path}"
        value = getattr(value, attribute)


@pytest.mark.parametrize("name", sorted(_vllm.NAMES))
def test_vllm_internal(name):
    assert _vllm.load(name) is not None


@pytest.mark.parametrize("argument", sorted(_ray.INIT_ARGUMENTS))
def test_ray_init_takes_the_private_argument(argument):
    assert f'kwargs.pop("{argument}"' in inspect.getsource(ray.init)


@pytest.mark.parametrize("kind", sorted(_vllm.PARSER_REGISTRIES))
def test_parser_names_read_without_importing_vllm_are_its_registry(kind):
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    manager = {"tool": ToolParserManager, "reasoning": ReasoningParserManager}[kind]
    assert _vllm.parser_names(kind) == set(manager.list_registered()) and "hf" in _vllm.parser_names(kind)


# A child of this process with two threads (renicing must reach each of them), sleeping 30 s.
TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"


def _two_threaded(*procs):
    """psutil's view of each Popen, once each has both of its threads."""
    import psutil

    views, deadline = [psutil.Process(p.pid) for p in procs], time.monotonic() + 10
    while any(v.num_threads() < 2 for v in views) and time.monotonic() < deadline:
        time.sleep(0.05)
    return views


def _nice_of_threads(proc) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()}


def test_ray_agents_are_reniced_to_the_workers_niceness_every_thread():
    import subprocess

    agent = subprocess.Popen(["bash", "-c",
                              f'exec -a "{_ray.load("AGENT_DASHBOARD")}" {sys.executable} -c "{TWO_THREADS}"'])
    other = subprocess.Popen([sys.executable, "-c", TWO_THREADS])
    try:
        procs = _two_threaded(agent, other)
        assert _ray.renice_agents(procs) == [agent.pid]
        niceness = [_nice_of_threads(p) for p in procs]
        assert niceness == [{15}, {os.getpriority(os.PRIO_PROCESS, 0)}]  # every thread of the agent, no other
    finally:
        agent.kill()
        other.kill()


def test_a_replicas_engine_processes_run_four_nice_levels_below_it_every_thread(monkeypatch):
    import subprocess

    monkeypatch.delenv("RAYLM_ENGINE_NICENESS", raising=False)
    engine = subprocess.Popen([sys.executable, "-c", TWO_THREADS])  # (the EngineCore: a child of the replica)
    try:
        [proc] = _two_threaded(engine)
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert engine.pid in _ray.renice_engine()
        assert _nice_of_threads(proc) == {min(19, own + 4)}
        assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the replica itself stays where it is
    finally:
        engine.kill()


def test_app_state_reads_the_controllers_details_as_serve_status_would():
    """serve_app's reading of `get_serve_instance_details` (Serve's enums, or their values): the application's
    status and message, and each deployment's status, message and replicas counted by state."""
    from ray.serve._private.common import DeploymentStatus
    from ray.serve.schema import ApplicationStatus, ReplicaState

    details = {"applications": {"raylm": {
        "status": ApplicationStatus.DEPLOYING, "message": "", "deployments": {
            "model-a": {"status": DeploymentStatus.UPDATING, "message": "1 replica starting",
                        "replicas": [{"state": ReplicaState.RUNNING}, {"state": ReplicaState.STARTING},
                                     {"state": "RUNNING"}]},
            "ingress": {"status": "HEALTHY", "replicas": []}}}}}
    app = _ray.app_state(details, "raylm")
    assert app == _ray.AppState("DEPLOYING", "", {
        "model-a": _ray.DeploymentState("UPDATING", "1 replica starting", {"RUNNING": 2, "STARTING": 1}),
        "ingress": _ray.DeploymentState("HEALTHY", "", {})})
    assert _ray.app_state(details, "other") is None and _ray.app_state({}, "raylm") is None
