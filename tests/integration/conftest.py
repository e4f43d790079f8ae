"""One real service for the integration tests: local Ray + Serve, three vLLM engines on the CPU."""


import pytest

from helpers import API_KEY, CPU_ENV, OTHER_KEY, TINY_ENGINE_ARGS, free_port

from raylm.config import AppConfig, ModelConfig, default_models


@pytest.fixture(scope="session")
def service(tiny_model, tmp_path_factory):
    from raylm.serve.control.service import start

    smollm2, minilm = default_models()
    config = AppConfig(
        models=(
            ModelConfig(name="tiny", source=str(tiny_model), num_cpus=0.25,
                        engine_args=TINY_ENGINE_ARGS, env=CPU_ENV),
            smollm2.model_copy(update={"num_cpus": 0.25, "env": CPU_ENV}),
            minilm.model_copy(update={"num_cpus": 0.25, "env": CPU_ENV}),
        ),
        serve={"port": free_port(), "metrics_port": free_port(), "num_cpus": 2,
               "api_keys": [{"tenant": "default", "key": API_KEY}, {"tenant": "other", "key": OTHER_KEY}],
               "batch_dir": str(tmp_path_factory.mktemp("batches")), "batch_max_file_bytes": 2**20,
               "batch_max_requests": 1000},
    )
    svc = start(config)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
