"""Config → Serve Application. The same function backs `raylm serve` and Serve YAML `import_path`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray.serve import Application

from raylm.config import AppConfig, ModelConfig, load_config
from raylm.models import BUNDLED_PREFIX

APP_NAME = "raylm"
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def deployment_name(model: ModelConfig) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model.name)


def _replica_env(model: ModelConfig) -> dict[str, str]:
    env = dict(model.env)
    if model.source.startswith(BUNDLED_PREFIX):
        env.setdefault("HF_HUB_OFFLINE", "1")  # bundled weights are local: never reach for a hub
    return env


def _bind(model: ModelConfig, config: AppConfig, peers: dict[str, Application] | None) -> Application:
    from raylm.serve.server import IngressDeployment, ModelDeployment

    deployment = ModelDeployment if peers is None else IngressDeployment
    args = () if peers is None else ({m.name: m.task for m in config.models}, peers)
    return deployment.options(
        name=deployment_name(model),
        num_replicas=model.replicas,
        max_ongoing_requests=model.max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus,
                           "runtime_env": {"env_vars": _replica_env(model)}},
    ).bind(model, str(config.serve.cache_dir), *args)


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
    ingress, *others = config.models
    peers = {m.name: _bind(m, config, None) for m in others}
    return _bind(ingress, config, peers)
