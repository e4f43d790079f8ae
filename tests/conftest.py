import os
import secrets
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every Ray cluster the tests start (ray.init, `ray start`) and join uses this session's own token: a fresh
# machine has no ~/.ray/auth_token, and `ray start` with token auth asked for does not make one.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

_MARKERS = {"integration": "integration", "cluster": "cluster", "chaos": "chaos", "security": "security"}


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in _MARKERS:
            item.add_marker(getattr(pytest.mark, _MARKERS[folder]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exit with the tests' status once pytest is done, skipping the interpreter's own teardown: seen once in CI,
    a run whose report was written segfaulted there (native threads of Ray's client libraries finalized while
    still running), and make took the 139 for the tests' result."""
    status = getattr(config, "_raylm_exitstatus", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def pytest_sessionfinish(session, exitstatus):
    session.config._raylm_exitstatus = int(exitstatus)


@pytest.fixture(scope="session")
def lora_dir(tiny_model, tmp_path_factory) -> Path:
    """Adapters of the tiny model, made with PEFT: a, b (in the service's config) and c (rank 8, for a
    run-time load), wide (rank 16, over the service's limit)."""
    from helpers import make_lora

    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("a", "b", "c")):
        make_lora(tiny_model, folder / name, seed)
    make_lora(tiny_model, folder / "wide", 9, rank=16)
    return folder


@pytest.fixture(scope="session")
def otlp():
    """A real OTLP/HTTP receiver the service exports its traces to."""
    from otlp import OTLPReceiver

    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def service(tiny_model, lora_dir, otlp, tmp_path_factory):
    """One real service for the integration and security tests: local Ray + Serve, five vLLM engines on the
    CPU, API keys on (tenant `default` an admin, `other` not; `ledger` for usage sums, `metered` with quotas),
    usage in an SQLite file, traces to a receiver, the edge's timeouts short enough to test."""
    from helpers import (API_KEY, CPU_ENV, LEDGER_KEY, METERED_KEY, METERED_QUOTA, OTHER_KEY, SERVICE_MAX_FILE_BYTES,
                         TINY_ENGINE_ARGS, free_port)

    from raylm.config import AppConfig, ModelConfig, default_models
    from raylm.serve.control.service import start

    smollm2, minilm = default_models()
    config = AppConfig(
        models=(
            ModelConfig(name="tiny", source=str(tiny_model), num_cpus=0.25,
                        engine_args=TINY_ENGINE_ARGS, env=CPU_ENV),
            # The same weights with a reasoning parser that reads text markers (Granite's), and structured
            # output in the reasoning too, so that a request can make the model write them (tests/integration/
            # test_tools.py).
            ModelConfig(name="tiny-think", source=str(tiny_model), num_cpus=0.25, reasoning_parser="granite",
                        engine_args={**TINY_ENGINE_ARGS, "structured_outputs_config": {"enable_in_reasoning": True}},
                        env=CPU_ENV),
            # LoRA: two adapters in the config, more loadable at run time from the adapters' folder
            # (tests/integration/test_lora.py).
            ModelConfig(name="tiny-lora", source=str(tiny_model), num_cpus=0.25, engine_args=TINY_ENGINE_ARGS,
                        env=CPU_ENV, adapters={"tiny-a": str(lora_dir / "a"), "tiny-b": str(lora_dir / "b")},
                        lora={"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 2, "load_dirs": [str(lora_dir)]}),
            smollm2.model_copy(update={"num_cpus": 0.25, "env": CPU_ENV}),
            minilm.model_copy(update={"num_cpus": 0.25, "env": CPU_ENV}),
        ),
        serve={"port": free_port(), "metrics_port": free_port(), "num_cpus": 2,
               "api_keys": [{"tenant": "default", "key": API_KEY}, {"tenant": "other", "key": OTHER_KEY},
                            {"tenant": "ledger", "key": LEDGER_KEY}, {"tenant": "metered", "key": METERED_KEY}],
               "tenants": {"metered": METERED_QUOTA},
               "usage": {"database": str(tmp_path_factory.mktemp("usage") / "usage.db")},
               "otlp_endpoint": otlp.endpoint,
               "admin_tenants": ["default"], "batch_dir": str(tmp_path_factory.mktemp("batches")),
               "batch_max_file_bytes": SERVICE_MAX_FILE_BYTES, "batch_max_stored_bytes": 4 * SERVICE_MAX_FILE_BYTES,
               "batch_max_requests": 1000,
               "http": {"header_timeout_s": 3, "write_timeout_s": 1}},
    )
    svc = start(config)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def client(service):
    from openai import OpenAI

    from helpers import API_KEY

    return OpenAI(base_url=f"{service.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
