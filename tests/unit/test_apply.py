"""Applying an edited config in place (`raylm serve` on SIGHUP): what it refuses before touching Serve, and
the drain it gives each leaving replica."""

import pytest

from raylm.config import AppConfig, ModelConfig
from raylm.serve.control.builder import _version, serve_options
from raylm.serve.control.service import Service


@pytest.mark.parametrize("change", [{"port": 8001}, {"host": "0.0.0.0"}, {"num_cpus": 4}])
def test_a_change_that_needs_a_restart_is_refused_and_nothing_is_deployed(change):
    model = ModelConfig(name="m", source="/m")
    running = Service(AppConfig(models=(model,)), started_ray=False, started_serve=False, url="http://x")
    edited = AppConfig(models=(model,), serve={**change, "allow_anonymous": True})
    with pytest.raises(ValueError, match="restart raylm serve"):
        running.apply(edited)
    assert running.config.serve.port == 8000  # unchanged


def test_a_leaving_model_replica_drains_for_serve_drain_s():
    assert serve_options(ModelConfig(name="m", source="/m"), drain_s=12)["graceful_shutdown_timeout_s"] == 12


def test_a_redeploy_replaces_a_model_only_when_its_replicas_would_differ():
    model = ModelConfig(name="m", source="/m", replicas=2)
    same = _version(model, "/cache", scaling=("replicas", "autoscaling"))
    assert _version(model.model_copy(update={"replicas": 1}), "/cache", scaling=("replicas", "autoscaling")) == same
    bigger = model.model_copy(update={"engine_args": {"max_model_len": 512}})
    assert _version(bigger, "/cache", scaling=("replicas", "autoscaling")) != same
    assert _version(model.model_copy(update={"replicas": 1}), "/cache") != _version(model, "/cache")


def test_serve_takes_a_version_of_ours():
    from ray import serve

    from raylm import _ray

    @serve.deployment
    class Nothing:
        pass

    assert _ray.versioned(Nothing, "abc").version == "abc"
