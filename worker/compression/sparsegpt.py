"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): OBS pruning with adaptive masks, optionally
quantizing the kept weights in the same pass (as the reference implementation does).

The mask is chosen as the sweep goes, from the current (already compensated) weights, scored by the
OBS saliency w^2 / [H^-1]_jj^2: unstructured picks the lowest scores of each block of columns
(all rows together), N:M keeps the n highest of every m consecutive columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.compression.gptq import (
    MaskChooser,
    check_finite,
    inverse_hessian_cholesky,
    new_grid,
    obs_sweep,
    prepare,
)
from worker.compression.prune import check_sparsity, nm_pattern, unstructured_ratio
from worker.compression.quantize import QuantizedWeight, pack_result
from worker.compression.specs import QuantSpec, SparsitySpec


def unstructured_chooser(ratio: float) -> MaskChooser:
    """At each block's first column, prune the int(ratio * block size) lowest-saliency weights."""

    def choose(block: Tensor, hinv_diag: Tensor, i: int) -> Tensor | None:
        if i != 0:
            return None
        saliency = block.pow(2) / hinv_diag.pow(2).unsqueeze(0)  # (d_out, count)
        k = int(saliency.numel() * ratio)
        lowest = torch.argsort(saliency.flatten(), stable=True)[:k]
        keep = torch.ones(saliency.numel(), dtype=torch.bool, device=block.device)
        keep[lowest] = False
        return keep.view_as(saliency)

    return choose


def nm_chooser(n: int, m: int) -> MaskChooser:
    """At every m-th column, keep the n highest-saliency weights of the next m columns per row."""

    def choose(block: Tensor, hinv_diag: Tensor, i: int) -> Tensor | None:
        if i % m != 0:
            return None
        saliency = block[:, i : i + m].pow(2) / hinv_diag[i : i + m].pow(2).unsqueeze(0)  # (d_out, m)
        top = torch.topk(saliency, n, dim=1).indices
        return torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, top, True)

    return choose


def sparsegpt_prune(
    w: Tensor,
    gram: Tensor,
    spec: SparsitySpec,
    quant: QuantSpec | None = None,
    name: str = "",
) -> tuple[Tensor, Tensor, QuantizedWeight | None]:
    """Prune w (d_out, d_in) against gram (d_in, d_in): (w_new, keep mask, quantized or None).

    With quant, kept weights are quantized in the same sweep (group params set when a group's first
    column comes, from the current values with already-pruned entries as 0) and w_new equals
    quantized.weight; pruned entries carry the zero point, so they dequantize to exactly 0.
    Columns are always visited in their original order (quant.act_order is not applied): N:M runs
    and pruning blocks are defined on that order. The block size comes from spec; the damping from
    quant when given (the job's quantization.damp: one Hessian, one damping), else from spec.
    """
    d_in = w.shape[-1]
    check_sparsity(spec, d_in)
    weight, hessian = prepare(w, gram, name)
    block_size = spec.block_size
    if spec.is_nm:
        n, m = nm_pattern(spec)
        choose = nm_chooser(n, m)
        block_size = max(m, block_size - block_size % m)  # N:M runs never straddle blocks
    else:
        choose = unstructured_chooser(unstructured_ratio(spec))
    grid = new_grid(quant, weight, w.dtype, None) if quant is not None else None
    hinv = inverse_hessian_cholesky(hessian, spec.damp if quant is None else quant.damp, name)
    keep = torch.ones_like(weight, dtype=torch.bool)  # (d_out, d_in), filled in by the sweep
    swept = obs_sweep(weight, hinv, block_size, grid, keep, choose)  # codes with a grid, else values
    quantized = None
    if grid is not None:
        quantized = pack_result(swept, grid.scales, grid.zeros, grid.group_size, grid.spec.bits, w.dtype)
        w_new = quantized.weight
    else:
        w_new = swept.to(w.dtype)
    check_finite(w_new, "pruned weight", name)
    return w_new, keep, quantized
