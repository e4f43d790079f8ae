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
