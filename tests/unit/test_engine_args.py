import pytest

from raylm.engine.vllm import VLLMEngine


def test_engine_args_pass_through_untouched():
    args = VLLMEngine("/m", "name", "generate", {"max_model_len": 512, "enforce-eager": True}).build_args()
    assert (args.model, args.served_model_name, args.max_model_len, args.enforce_eager) == (
        "/m", ["name"], 512, True)


def test_embed_task_uses_the_pooling_runner():
    assert VLLMEngine("/m", "e", "embed", {}).build_args().runner == "pooling"


def test_unknown_engine_argument_is_refused():
    with pytest.raises(ValueError, match="max_modle_len"):
        VLLMEngine("/m", "n", "generate", {"max_modle_len": 1}).build_args()


def test_a_mapping_is_parsed_as_vllm_serve_parses_it():
    """vLLM makes some config objects from a mapping only on its command line (structured_outputs_config)."""
    from vllm.config import StructuredOutputsConfig

    args = VLLMEngine("/m", "n", "generate", {"structured_outputs_config": {"enable_in_reasoning": True},
                                              "override_generation_config": {"temperature": 0.0}}).build_args()
    assert isinstance(args.structured_outputs_config, StructuredOutputsConfig)
    assert args.structured_outputs_config.enable_in_reasoning is True
    assert args.override_generation_config == {"temperature": 0.0}
