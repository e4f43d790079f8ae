"""Fixes for vLLM bugs that raylm's users would hit, applied while upstream's fix is pending.

vLLM loads this in each of its processes (EngineCore, workers) through its own plugin entry point
(`vllm.general_plugins` in pyproject.toml). Each fix first checks that the bug is there, so a vLLM that has
fixed it is left alone and this file can be emptied.
"""

from __future__ import annotations

import logging
from typing import Any

from raylm import _vllm

logger = logging.getLogger(__name__)


def register() -> None:
    try:
        _lora_rows_without_adapter()
    except Exception as exc:  # never in the way of an engine starting; the bug is then as upstream left it
        logger.warning("raylm: vLLM LoRA fix not applied: %r", exc)


def _lora_rows_without_adapter() -> None:
    """vLLM 0.32's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather each token's adapter weights
    with `weights[index]`, and a token of a request without an adapter has index -1: it gets the adapter in
    the last slot. A base-model request batched beside adapter requests answered with an adapter's weights
    (seen: tests/integration/test_lora.py; vLLM PRs 48421 and 49656, open). The Triton kernels skip -1 rows.

    Replaced by ops that skip them too, and that multiply each adapter's rows by its weights in one matmul
    instead of gathering a weight matrix per token (what the gather cost: benchmarks/lora.py, docs/lora.md)."""
    ops, *importers = (_vllm.module(n) for n in ("lora_cpu_ops", "lora_cpu_ops_export", "lora_cpu_punica"))
    if not _aliases_last_slot(ops.bgmv_shrink):
        return
    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name, op in fixed.items():
        for module in (ops, *importers):  # sgmv_* call them through lora_ops' globals
            setattr(module, name, op)
    logger.info("raylm: vLLM's CPU LoRA ops skip tokens without an adapter (index -1), one matmul per adapter")


def _aliases_last_slot(shrink: Any) -> bool:
    import torch

    weights = torch.ones(2, 1, 1, 1)  # (slots, 1, rank, hidden)
    out = torch.zeros(1, 1)
    shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _per_adapter(inputs: Any, weights: Any, indices: Any, dtype: Any) -> tuple[Any, Any] | None:
    """(each row's inputs @ its adapter's weights.T, the rows that have an adapter), None when no row has
    one (a base-model batch: nothing to add). weights: (slots, [1,] out, in); a row's slot is its index, -1
    for none. One matmul against every slot's weights side by side,
    no weight matrix gathered per token (vLLM's gather built a tokens × out × in tensor: 78 MB per op for a
    1,600-token prefill of SmolLM2). The rank side is the small one: a shrink (in: hidden, out: rank) computes
    every slot's rank columns and keeps the row's own; an expand (in: rank) places each row's inputs in its
    slot's columns, zeros elsewhere."""
    import torch

    has = indices >= 0
    if not bool(has.any()):
        return None
    w = (weights.squeeze(1) if weights.dim() == 4 else weights).to(dtype)
    slots, out_dim, in_dim = w.shape
    rows, slot = torch.arange(indices.shape[0]), indices.clamp(min=0)
    x = inputs.to(dtype)
    if in_dim >= out_dim:
        every = x @ w.reshape(slots * out_dim, in_dim).T
        return every.view(-1, slots, out_dim)[rows, slot], has
    placed = x.new_zeros((indices.shape[0], slots, in_dim))
    placed[rows, slot] = x
    return placed.view(-1, slots * in_dim) @ w.transpose(1, 2).reshape(slots * in_dim, out_dim), has


def _write(output: Any, columns: slice, values: Any, rows: Any, add: bool) -> None:
    """output[rows, columns] (+)= values[rows]; all rows at once (a view, no copy) when all have an adapter."""
    if bool(rows.all()):
        if add:
            output[:, columns] += values
        else:
            output[:, columns] = values
    elif add:
        output[rows, columns] += values[rows]
    else:
        output[rows, columns] = values[rows]


def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    found = _per_adapter(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    if found is not None:
        _write(output_tensor, slice(0, found[0].shape[1]), scaling * found[0], found[1], add=False)


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    found = _per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if found is None:
        return
    out, rows = found
    common = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if out.shape[0] == 1 and output_tensor.shape[0] != 1:  # one row for every row: vLLM's op broadcasts it
        out, rows = out.expand(output_tensor.shape[0], -1), rows.expand(output_tensor.shape[0])
    _write(output_tensor, slice(0, common), out[:, :common], rows, add_inputs)


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    found = _per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if found is not None:
        _write(output_tensor, slice(slice_offset, slice_offset + slice_size), found[0], found[1], add_inputs)
