"""LoRA's parts apart from a service: the run-time registry's folder rule, and vLLM's CPU ops mended."""

import asyncio

import pytest

from raylm import errors
from raylm.config import ModelConfig
from raylm.serve.edge.adapters import Adapters


def test_run_time_adapters_load_only_from_the_models_folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "x").mkdir(parents=True), outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    model = ModelConfig(name="m", source="x", lora={"load_dirs": [str(allowed)]})
    rule = Adapters._allowed
    assert rule(model, str(allowed / "x")) == allowed / "x"
    for path in (str(outside), f"{allowed}/../outside", str(allowed / "escape"), "/etc"):
        with pytest.raises(errors.PermissionDeniedError):
            rule(model, path)


def test_the_base_model_of_a_run_time_load_is_the_one_that_takes_them_or_must_be_named(tmp_path):
    takes = ModelConfig(name="takes", source="x", lora={"load_dirs": [str(tmp_path)]})
    registry = Adapters([takes, ModelConfig(name="plain", source="y")], "app")
    assert registry._base(None).name == "takes"
    with pytest.raises(errors.InvalidRequestError, match="model 'plain' takes no run-time adapters"):
        registry._base("plain")
    two = Adapters([takes, takes.model_copy(update={"name": "also"})], "app")
    with pytest.raises(errors.InvalidRequestError, match="name the base model in `model`: takes, also"):
        two._base(None)
    with pytest.raises(errors.InvalidRequestError, match="none takes run-time adapters"):
        asyncio.run(Adapters([ModelConfig(name="plain", source="y")], "app").load("n", str(tmp_path), None))


def test_vllms_cpu_lora_ops_leave_tokens_without_an_adapter_alone():
    import torch

    from raylm import _vllm
    from raylm.engine import vllm_fixes

    vllm_fixes.register()
    ops = _vllm.module("lora_cpu_ops")
    weights = torch.ones(2, 1, 3, 4)  # two adapter slots, rank 3, hidden 4
    out = torch.full((2, 3), 7.0)
    ops.bgmv_shrink(torch.ones(2, 4), weights, out, torch.tensor([-1, 1]), 1.0)
    assert out.tolist() == [[7.0] * 3, [4.0] * 3]  # the -1 row untouched (it got slot 1's before)
    assert _vllm.module("lora_cpu_punica").bgmv_expand is ops.bgmv_expand  # where the CPU wrapper calls it
