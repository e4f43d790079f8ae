import pytest
import yaml
from pydantic import ValidationError

from raylm.config import AppConfig, DataConfig, ModelConfig, ServeConfig, load_config


def test_defaults_serve_the_bundled_pair_on_loopback():
    config = load_config()
    assert [m.name for m in config.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert [m.task for m in config.models] == ["generate", "embed"]
    assert all(m.source.startswith("bundled:") for m in config.models)
    assert (config.serve.host, config.serve.port, config.serve.address) == ("127.0.0.1", 8000, None)


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "a", "source": "/models/a", "replicas": 2, "num_cpus": 0.5,
                    "engine_args": {"max_model_len": 512, "enforce_eager": True}},
                   {"name": "e", "source": "bundled:all-minilm-l6-v2", "task": "embed"}],
        "serve": {"port": 9000, "host": "127.0.0.1"},
    }))
    config = load_config(path, port=9100, address="auto", replicas=3)
    assert config.serve.port == 9100 and config.serve.address == "auto"
    assert [m.replicas for m in config.models] == [3, 3]
    assert config.models[0].engine_args == {"max_model_len": 512, "enforce_eager": True}


def test_model_flag_replaces_first_model_and_keeps_resources():
    config = load_config(model="HuggingFaceTB/SmolLM2-360M-Instruct")
    first = config.models[0]
    assert (first.name, first.source, first.engine_args) == (
        "SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", {})
    assert first.env == load_config().models[0].env


@pytest.mark.parametrize("bad", [
    {"models": []},
    {"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]},
    {"models": [{"name": "a", "source": "x", "replicas": 0}]},
    {"models": [{"name": "a", "source": "x", "task": "dance"}]},
    {"models": [{"name": "a", "source": "x", "typo_field": 1}]},
    {"serve": {"port": 70000}},
])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        AppConfig.model_validate(bad)


def test_cli_override_is_validated_too():
    with pytest.raises(ValidationError):
        load_config(replicas=0)


def test_config_is_frozen_and_documented():
    model = ModelConfig(name="a", source="x")
    with pytest.raises(ValidationError):
        model.replicas = 4
    for cls in (ModelConfig, AppConfig, ServeConfig, DataConfig):
        assert all(f.description for f in cls.model_fields.values()), cls
