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


def test_vllms_cpu_lora_ops_leave_tokens_without_an_adapter_alone_and_give_the_others_their_own():
    import torch

    from raylm import _vllm
    from raylm.engine import vllm_fixes

    vllm_fixes.register()
    ops = _vllm.module("lora_cpu_ops")
    assert _vllm.module("lora_cpu_punica").bgmv_expand is ops.bgmv_expand  # where the CPU wrapper calls it
    torch.manual_seed(0)
    slots, rank, hidden, out_dim, tokens = 3, 4, 16, 24, 9
    index = torch.tensor([-1, 0, 2, 1, -1, 2, 2, 0, -1])
    a, b = torch.randn(slots, 1, rank, hidden), torch.randn(slots, 1, out_dim, rank)
    x, h = torch.randn(tokens, hidden), torch.randn(tokens, rank)
    mine = index >= 0

    def reference(inputs, weights):  # each token through its own adapter's weights
        return torch.stack([weights[max(int(i), 0), 0] @ inputs[t] for t, i in enumerate(index)])

    shrunk = torch.full((tokens, rank), 7.0)
    ops.bgmv_shrink(x, a, shrunk, index, 0.5)
    assert torch.equal(shrunk[~mine], torch.full((3, rank), 7.0))  # vLLM 0.32 gave them slot 2's
    assert torch.allclose(shrunk[mine], 0.5 * reference(x, a)[mine], atol=1e-5)
    for add in (True, False):
        before = torch.randn(tokens, 2 * out_dim)
        expanded = before.clone()
        ops.bgmv_expand_slice(h, b, expanded, index, out_dim, out_dim, add)
        assert torch.equal(expanded[~mine], before[~mine]) and torch.equal(expanded[:, :out_dim], before[:, :out_dim])
        want = reference(h, b)[mine] + (before[mine, out_dim:] if add else 0)
        assert torch.allclose(expanded[mine, out_dim:], want, atol=1e-4)
    untouched = torch.randn(tokens, out_dim)
    base_only = untouched.clone()
    ops.bgmv_expand(h, b, base_only, torch.full((tokens,), -1), True)  # a batch of base-model requests only
    assert torch.equal(base_only, untouched)
