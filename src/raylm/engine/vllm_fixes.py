"""Fixes for vLLM bugs that raylm's users would hit, applied while upstream's fix is pending.

vLLM loads this in each of its processes (EngineCore, workers) through its own plugin entry point
(`vllm.general_plugins` in pyproject.toml). Each fix first checks that the bug is there, so a vLLM that has
fixed it is left alone and this file can be emptied.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from raylm import _vllm

logger = logging.getLogger(__name__)


def register() -> None:
    try:
        _lora_rows_without_adapter()
    except Exception as exc:  # never in the way of an engine starting; the bug is then as upstream left it
        logger.warning("raylm: vLLM LoRA fix not applied: %r", exc)


_LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _lora_rows_without_adapter() -> None:
    """vLLM 0.32's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather each token's adapter weights
    with `weights[index]`, and a token of a request without an adapter has index -1: it gets the adapter in
    the last slot. A base-model request batched beside adapter requests answered with an adapter's weights
    (seen: tests/integration/test_lora.py; vLLM PRs 48421 and 49656, open). The Triton kernels skip -1 rows;
    so do these, wrapped: rows with -1 are computed on slot 0 and then put back as they were."""
    ops, *importers = (_vllm.module(n) for n in ("lora_cpu_ops", "lora_cpu_ops_export", "lora_cpu_punica"))
    if not _aliases_last_slot(ops.bgmv_shrink):
        return
    for name in _LORA_OPS:
        fixed = _skipping_rows_without_adapter(getattr(ops, name))
        for module in (ops, *importers):  # sgmv_* call them through lora_ops' globals
            setattr(module, name, fixed)
    logger.info("raylm: vLLM's CPU LoRA ops skip tokens without an adapter (index -1)")


def _aliases_last_slot(shrink: Any) -> bool:
    import torch

    weights = torch.ones(2, 1, 1, 1)  # (slots, 1, rank, hidden)
    out = torch.zeros(1, 1)
    shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _skipping_rows_without_adapter(op: Any) -> Any:
    @functools.wraps(op)
    def fixed(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        skip = indices < 0
        if not bool(skip.any()) or output.shape[0] != skip.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[skip].clone()
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[skip] = kept
        return None
    return fixed
