import re

import pytest
import yaml
from pydantic import ValidationError

from raylm.config import AdmissionConfig, AppConfig, DataConfig, ModelConfig, ServeConfig, load_config


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


@pytest.mark.parametrize("bad,says", [
    ({"models": []}, "at least one model"),
    ({"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}, "duplicate model or adapter names: a"),
    ({"models": [{"name": "a", "source": "x", "replicas": 0}]}, "models.0.replicas"),
    ({"models": [{"name": "a", "source": "x", "task": "dance"}]}, "models.0.task"),
    ({"models": [{"name": "a", "source": "x", "typo_field": 1}]}, "models.0.typo_field"),
    ({"serve": {"port": 70000}}, "serve.port"),
    ({"serve": {"http": {"write_timeout_s": 600}}}, "serve.http.write_timeout_s"),
])
def test_invalid_configs_are_refused_naming_the_field(bad, says):
    with pytest.raises(ValidationError, match=re.escape(says)):
        AppConfig.model_validate(bad)


def test_tool_and_reasoning_fields_are_checked_against_vllms_parsers(tmp_path):
    with pytest.raises(ValidationError, match="tool_call_parser 'hermess' of model 'a' is not one of vLLM's: "
                                              ".*hermes.*llama3_json"):
        ModelConfig(name="a", source="x", tool_call_parser="hermess")
    with pytest.raises(ValidationError, match="reasoning_parser 'r1' of model 'a' is not one of .*deepseek_r1"):
        ModelConfig(name="a", source="x", reasoning_parser="r1")
    with pytest.raises(ValidationError, match="enable_auto_tool_choice of model 'a' needs a tool_call_parser"):
        ModelConfig(name="a", source="x", enable_auto_tool_choice=True)
    with pytest.raises(ValidationError, match="chat_template of model 'a': no file"):
        ModelConfig(name="a", source="x", chat_template=tmp_path / "missing.jinja")
    with pytest.raises(ValidationError, match="tool_strict_level"):
        ModelConfig(name="a", source="x", tool_call_parser="hermes", tool_strict_level="loose")
    # A parser of a plugin vLLM loads at start is not known here: not refused.
    ModelConfig(name="a", source="x", tool_call_parser="mine", engine_args={"tool_parser_plugin": "/p.py"})


def test_tool_fields_become_vllms_serve_arguments_and_old_engine_args_move_to_them(tmp_path):
    from raylm.serve.control.builder import engine_args

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    model = ModelConfig(name="a", source="x", tool_call_parser="llama3_json", reasoning_parser="deepseek_r1",
                        chat_template=template)
    assert {k: v for k, v in engine_args(model).items() if k != "max_num_seqs"} == {
        "tool_call_parser": "llama3_json", "tool_strict_level": "parameter", "enable_auto_tool_choice": True,
        "reasoning_parser": "deepseek_r1", "chat_template": str(template)}
    assert engine_args(ModelConfig(name="a", source="x")).keys() == {"max_num_seqs"}
    old = ModelConfig(name="a", source="x", engine_args={"tool-call-parser": "hermes", "max_model_len": 512,
                                                         "enable_auto_tool_choice": False})
    assert (old.tool_call_parser, old.enable_auto_tool_choice, old.engine_args) == ("hermes", False,
                                                                                    {"max_model_len": 512})
    assert engine_args(old)["enable_auto_tool_choice"] is False
    with pytest.raises(ValidationError, match="`tool_call_parser` is set both as a field and in engine_args"):
        ModelConfig(name="a", source="x", tool_call_parser="hermes", engine_args={"tool_call_parser": "hermes"})
    # The bundled chat model calls tools; another model given with --model starts without its parser.
    assert load_config().models[0].tool_call_parser == "hermes"
    assert load_config(model="/models/other").models[0].tool_call_parser is None
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "source": "x", "tool_call_parser": "hermes",
                                                "enable_auto_tool_choice": True}]}))
    assert load_config(path, model="/models/other").models[0].enable_auto_tool_choice is None


def test_cli_override_is_validated_too():
    with pytest.raises(ValidationError, match="replicas"):
        load_config(replicas=0)


def test_config_is_frozen_and_documented():
    model = ModelConfig(name="a", source="x")
    with pytest.raises(ValidationError, match="frozen"):
        model.replicas = 4
    for cls in (ModelConfig, AppConfig, ServeConfig, DataConfig):
        assert all(f.description for f in cls.model_fields.values()), cls


def test_admission_sets_serve_limits_and_engine_batch():
    from raylm.serve.control.builder import REFUSAL_HEADROOM, engine_args, serve_options

    model = ModelConfig(name="m", source="/m", admission={"max_running": 8, "max_queued": 16, "burst": 2,
                                                          "retry_after_s": 3})
    options = serve_options(model)
    assert options["max_ongoing_requests"] == 8 + 2 + 2 * 16 + REFUSAL_HEADROOM and options["max_queued_requests"] == 16 + REFUSAL_HEADROOM
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 3}
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert engine_args(model)["max_num_seqs"] == 10  # batch + burst: every sequence admission runs
    assert engine_args(model.model_copy(update={"engine_args": {"max_num_seqs": 4}}))["max_num_seqs"] == 4


def test_admission_batch_follows_the_engine_batch_unless_set():
    from raylm.serve.control.builder import engine_args

    def running(**kw) -> int:
        return ModelConfig(name="m", source="/m", **kw).admission.max_running

    assert running() == 32  # a CPU: each stream's speed and tenants' isolation over TTFT under overload
    assert running(num_gpus=1) == 248 and running(num_gpus=0.5, admission={"burst": 0}) == 256  # vLLM's batch
    gpu = ModelConfig(name="m", source="/m", num_gpus=1)
    assert engine_args(gpu)["max_num_seqs"] == 256  # ...so the engine's batch is vLLM's own
    assert running(engine_args={"max_num_seqs": 64}) == 56 and running(engine_args={"max_num_seqs": 4}) == 1
    assert running(num_gpus=1, admission={"max_running": 10}) == 10  # what the config sets wins
    assert running(admission=AdmissionConfig(burst=4), engine_args={"max_num_seqs": 64}) == 60


def test_autoscaling_goes_to_serve_and_excludes_fixed_replicas():
    from raylm.serve.control.builder import serve_options

    model = ModelConfig(name="m", source="/m", autoscaling={"min_replicas": 0, "max_replicas": 3})
    scaling = serve_options(model)["autoscaling_config"]
    assert "num_replicas" not in serve_options(model)
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (0, 3, 32)
    from ray.serve.config import AutoscalingConfig

    assert AutoscalingConfig(**scaling).metrics_interval_s == 1.0  # Serve takes it: reports every second
    with pytest.raises(ValidationError, match="either `replicas` or `autoscaling`"):
        ModelConfig(name="m", source="/m", replicas=2, autoscaling={"max_replicas": 3})
    with pytest.raises(ValidationError, match="min_replicas"):
        ModelConfig(name="m", source="/m", autoscaling={"min_replicas": 4, "max_replicas": 3})


def test_replicas_flag_turns_autoscaling_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "a", "source": "/a", "autoscaling": {"max_replicas": 4}}]}))
    config = load_config(path, replicas=2)
    assert config.models[0].replicas == 2 and config.models[0].autoscaling is None


def test_data_jobs_take_their_model_from_the_served_models():
    cfg = AppConfig.model_validate({
        "models": [{"name": "chat", "source": "/m/chat", "num_cpus": 2, "num_gpus": 1,
                    "engine_args": {"dtype": "float16", "max_model_len": 2048}, "env": {"A": "1"}},
                   {"name": "vec", "source": "/m/vec", "task": "embed"}],
        "data": {"engine_args": {"max_model_len": 1024}, "env": {"B": "2"}}})
    chat = cfg.data_model("chat", "generate")
    assert (chat.source, chat.num_cpus, chat.num_gpus) == ("/m/chat", 2, 1)  # the GPU stage reserves its GPU
    # The user's engine arguments reach the stage untouched (dtype too); data's go on top of the model's.
    assert chat.engine_args == {"dtype": "float16", "max_model_len": 1024}
    assert chat.env == {"A": "1", "B": "2"}
    with pytest.raises(ValueError, match="embed model"):
        cfg.data_model("vec", "generate")
    assert cfg.data_model("vec", None).source == "/m/vec"  # a tokenizer may come from any model
    other = cfg.data_model("/some/folder", "embed")
    assert (other.source, other.task, other.engine_args, other.num_gpus) == ("/some/folder", "embed",
                                                                              {"enforce_eager": True,
                                                                               "max_model_len": 1024}, 0)
    assert other.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "B": "2"}
    # The bundled models' names resolve even when the config serves others.
    assert cfg.data_model(cfg.data.generate_model, "generate").source == "bundled:smollm2-135m-instruct"
    sized = AppConfig.model_validate({"data": {"num_cpus": 0.5, "num_gpus": 1}}).data_model("all-minilm-l6-v2", "embed")
    assert (sized.num_cpus, sized.num_gpus, sized.env) == (0.5, 1, {"VLLM_CPU_KVCACHE_SPACE": "1"})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from helpers import make_lora, make_tiny_llama

    folder = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(folder / "tiny")
    return {"r8": make_lora(base, folder / "r8", 0), "r16": make_lora(base, folder / "r16", 1, rank=16)}


def test_adapters_are_checked_when_the_config_loads_naming_the_adapter(adapters, tmp_path):
    with pytest.raises(ValidationError, match="adapter 'sql': no adapter folder /nowhere"):
        ModelConfig(name="m", source="x", adapters={"sql": "/nowhere"})
    with pytest.raises(ValidationError, match="adapter 'sql': org/none is neither a folder nor an HF id"):
        ModelConfig(name="m", source="x", adapters={"sql": "org/none"})
    with pytest.raises(ValidationError, match="adapter 'big' has rank 16, over max_lora_rank 8: raise lora"):
        ModelConfig(name="m", source="x", adapters={"big": str(adapters["r16"])}, lora={"max_lora_rank": 8})
    with pytest.raises(ValidationError, match=f"adapter 'x': {tmp_path} has no readable adapter_config.json"):
        ModelConfig(name="m", source="x", adapters={"x": str(tmp_path)})
    with pytest.raises(ValidationError, match="max_cpu_loras \\(1\\) must be at least max_loras \\(2\\)"):
        ModelConfig(name="m", source="x", lora={"max_loras": 2, "max_cpu_loras": 1})
    with pytest.raises(ValidationError, match="LoRA adapters need a generate model"):
        ModelConfig(name="m", source="x", task="embed", adapters={"a": str(adapters["r8"])})
    with pytest.raises(ValidationError, match="duplicate model or adapter names: a"):
        AppConfig(models=[ModelConfig(name="m", source="x", adapters={"a": str(adapters["r8"])}),
                          ModelConfig(name="a", source="y")])
    with pytest.raises(ValidationError, match="max_lora_rank"):
        ModelConfig(name="m", source="x", lora={"max_lora_rank": 12})


def test_adapters_turn_lora_on_in_the_engine_with_the_models_limits(adapters):
    from raylm.serve.control.builder import engine_args

    model = ModelConfig(name="m", source="x", adapters={"a": str(adapters["r16"])},
                        lora={"max_loras": 2, "max_lora_rank": 16})
    args = engine_args(model)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"], args["max_cpu_loras"]) == (True, 2, 16, 2)
    assert "enable_lora" not in engine_args(ModelConfig(name="m", source="x"))
    # --model: the adapters belonged to the old weights
    tree = {"models": [model.model_dump(mode="json")]}
    path = adapters["r8"].parent / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    replaced = load_config(path, model="other/model").models[0]
    assert replaced.adapters == {} and replaced.lora is None


def test_a_data_job_named_by_adapter_runs_its_base_model_with_lora_on(adapters):
    app = AppConfig(models=[ModelConfig(name="m", source="x", adapters={"a": str(adapters["r8"])})])
    model = app.data_model("a", "generate")
    assert model.name == "m" and model.engine_args["enable_lora"] and model.engine_args["max_lora_rank"] == 16


def test_a_config_file_that_is_not_yaml_is_a_clear_config_error(tmp_path):
    path = tmp_path / "raylm.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(path)
