"""Warm workers (serve/replica/warm.py): which models keep them, the runtime env that makes the raylet give one
to a replica, and how a node's idle ones are found."""

import json
import subprocess
import sys
import time

import psutil

from raylm import _ray
from raylm.config import ModelConfig
from raylm.serve.replica import warm


def test_a_model_that_autoscales_keeps_one_warm_worker_and_a_fixed_one_none_unless_told():
    fixed = ModelConfig(name="a", source="/m/a", replicas=2)
    scaled = ModelConfig(name="b", source="/m/b", autoscaling={"min_replicas": 0, "max_replicas": 2})
    pinned = ModelConfig(name="c", source="/m/c", autoscaling={"min_replicas": 2, "max_replicas": 2})
    assert (fixed.spares, scaled.spares, pinned.spares) == (0, 1, 0)
    assert fixed.model_copy(update={"warm_workers": 2}).spares == 2
    assert scaled.model_copy(update={"warm_workers": 0}).spares == 0


def test_a_replicas_runtime_env_runs_the_preimport_hook_and_is_its_models_own():
    hook = _ray.load("SETUP_HOOK_ENV")
    cpu = warm.runtime_env(ModelConfig(name="a", source="/m/a", env={"X": "1"}))["env_vars"]
    assert cpu[hook] == "raylm.serve.replica.warm.preimport" and cpu["RAYLM_MODEL"] == "a" and cpu["X"] == "1"
    assert "RAYLM_ENGINE_CORE_START" not in cpu and "RAYLM_PREIMPORT" not in cpu  # forkserver, all imports
    twin = warm.runtime_env(ModelConfig(name="b", source="/m/a", env={"X": "1"}))
    assert _ray.runtime_env_string(twin) != _ray.runtime_env_string({"env_vars": cpu})  # never each other's
    gpu = warm.runtime_env(ModelConfig(name="g", source="/m/g", num_gpus=1))["env_vars"]
    assert gpu["RAYLM_ENGINE_CORE_START"] == "spawn" and gpu["RAYLM_PREIMPORT"] == "serve"
    # Ray's own serialization of an actor's runtime env (what Serve's controller sends), key order included
    assert _ray.runtime_env_string({"env_vars": {"b": "1", "a": "2"}}) == json.dumps(
        {"env_vars": {"a": "2", "b": "1"}}, sort_keys=True)


def test_a_nodes_warm_workers_are_found_by_their_marks_while_idle(tmp_path):
    """A mark counts while its process is still an idle Ray worker (its title): not once a replica took it (its
    title changes) or it is gone; those marks are removed. A mark names the key of its worker's runtime env,
    which changes with the model's environment."""
    model = ModelConfig(name="m", source="/m/m")
    key = warm.key_of(model)
    assert key != warm.key_of(model.model_copy(update={"env": {"X": "2"}}))
    # As Ray's workers name themselves: its setproctitle, in a command line long enough for the title (else the
    # title takes the room of the environment, which then reads empty)
    code = "import sys, time; from ray._raylet import setproctitle; setproctitle(sys.argv[1]); time.sleep(60)"
    titles = ("ray::IDLE", "ray::ServeReplica:raylm:model-m", "ray::IDLE")
    procs = [subprocess.Popen([sys.executable, "-c", code, title, "-" * 200]) for title in titles]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        for proc, state in zip([*procs[:2], gone], ("warm", "warm", "importing")):
            (tmp_path / f"{key}.{proc.pid}").write_text(state)
        (tmp_path / f"otherkey.{procs[2].pid}").write_text("importing")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                psutil.Process(p.pid).cmdline()[:1] != [t] for p, t in zip(procs, titles)):
            time.sleep(0.2)
        assert warm.idle(key, tmp_path) == {procs[0].pid: (key, "warm")}
        assert warm.idle(None, tmp_path) == {procs[0].pid: (key, "warm"), procs[2].pid: ("otherkey", "importing")}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{key}.{procs[0].pid}",
                                                                     f"otherkey.{procs[2].pid}"])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
