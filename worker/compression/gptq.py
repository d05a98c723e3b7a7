"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) and the OBS column sweep it shares with SparseGPT.

The sweep visits columns left to right; each column is fixed to its target (a grid point, or 0 when
pruned) and the error (w - q) / [H^-1]_jj is spread over the columns not yet visited through the upper
Cholesky factor of H^-1. Updates are applied lazily per block of columns (one matmul per block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.compression.quantize import (
    QuantizedWeight,
    dequantize_codes,
    effective_group_size,
    group_params,
    pack_result,
    quant_params,
    quantize_to_codes,
)
from worker.compression.specs import QuantSpec

# (W1 (d_out, count) current block values, diag of the block's H^-1 factor (count,), i) -> keep mask
# (d_out, k) for block columns i..i+k-1, or None to leave the mask as it is.
MaskChooser = Callable[[Tensor, Tensor, int], Tensor | None]

DAMP_RETRIES = 4  # tries at damp, then x10 each time (from at least 1e-4 when damp is 0)


def check_finite(t: Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{name or '<unnamed module>'}: {what} has non-finite values")


def prepare(w: Tensor, gram: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """fp32 working copy of w and fp64 copy of gram with dead inputs neutralised.

    A dead input (diag 0: never active in calibration) has no information; its column is set to 0
    and its Hessian diagonal to 1 so the factorisation exists and no error flows through it.
    """
    if w.dim() != 2 or gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"{name}: weight {tuple(w.shape)} and gram {tuple(gram.shape)} do not match")
    check_finite(w, "weight", name)
    check_finite(gram, "gram", name)
    weight = w.to(torch.float32, copy=True)  # (d_out, d_in)
    hessian = gram.to(torch.float64, copy=True)  # (d_in, d_in)
    dead = torch.diagonal(hessian) == 0  # (d_in,)
    hessian.diagonal()[dead] = 1.0
    weight[:, dead] = 0.0
    return weight, hessian


def inverse_hessian_cholesky(hessian: Tensor, damp: float, name: str) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so H^-1 = U^T U; fp64 math, fp32 out.

    A calibration set with fewer independent tokens than inputs gives a singular H; the damping is
    raised x10 up to DAMP_RETRIES times before giving up.
    """
    mean_diag = torch.diagonal(hessian).mean()
    frac = damp
    for _ in range(DAMP_RETRIES):
        damped = hessian.clone()
        damped.diagonal().add_(frac * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32)
        tried = frac
        frac = max(frac * 10.0, 1e-4)
    raise torch.linalg.LinAlgError(
        f"{name or '<unnamed module>'}: Hessian is not positive definite even with damping "
        f"{tried:g} x mean(diag); the calibration inputs are degenerate"
    )


@dataclass
class GroupGrid:
    """Quantization grid of one weight during a sweep; params indexed by original-order group."""

    spec: QuantSpec
    group_size: int
    scale_dtype: torch.dtype
    col_group: list[int]  # group of each swept column, in sweep order
    scales: Tensor  # (d_out, n_groups) fp32
    zeros: Tensor  # (d_out, n_groups) fp32, integer valued
    static: bool  # params fixed before the sweep (act order) or set when a group's first column comes

    @property
    def maxq(self) -> int:
        return 2**self.spec.bits - 1


def new_grid(spec: QuantSpec, weight: Tensor, dtype: torch.dtype, perm: Tensor | None) -> GroupGrid:
    """Grid for weight (d_out, d_in) in original column order; perm = sweep order (act order)."""
    d_out, d_in = weight.shape
    gs = effective_group_size(spec, d_in)
    order = torch.arange(d_in) if perm is None else perm.cpu()
    grid = GroupGrid(
        spec=spec,
        group_size=gs,
        scale_dtype=dtype,
        col_group=(order // gs).tolist(),
        scales=torch.ones(d_out, d_in // gs, dtype=torch.float32, device=weight.device),
        zeros=torch.zeros(d_out, d_in // gs, dtype=torch.float32, device=weight.device),
        static=perm is not None,
    )
    if grid.static:
        # Static groups: params from the original contiguous groups, so each group still holds
        # consecutive input columns (what the export format expects) though visited out of order.
        grid.scales, grid.zeros = group_params(weight, spec, gs, dtype)
    return grid


def obs_sweep(
    weight: Tensor,
    hinv: Tensor,
    block_size: int,
    grid: GroupGrid | None,
    keep: Tensor,
    choose: MaskChooser | None = None,
) -> Tensor:
    """Fix every column in turn with OBS error feedback.

    weight: (d_out, d) fp32 in sweep order, consumed (updated in place). hinv: (d, d) upper Cholesky
    factor of H^-1 in the same order. keep: (d_out, d) bool, True = keep; pruned entries become
    exactly 0 (code = zero point); `choose` may fill it during the sweep (SparseGPT).
    Returns, without a grid, the values (d_out, d) fp32: pruned and compensated weights; with one,
    the codes (d_out, d) uint8, whose dequantization is the result.
    """
    d = weight.shape[1]
    # (d_out, d): values without a grid, codes with one
    out = torch.zeros_like(weight) if grid is None else torch.zeros_like(weight, dtype=torch.uint8)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        block = weight[:, i1:i2].clone()  # (d_out, count): gets this block's updates eagerly
        errors = torch.zeros_like(block)  # (d_out, count): scaled errors, for the lazy update
        hinv_block = hinv[i1:i2, i1:i2]  # (count, count)
        hinv_diag = torch.diagonal(hinv_block)  # (count,)
        keep_block = keep[:, i1:i2]  # view: choices land in `keep`
        for i in range(i2 - i1):
            j = i1 + i
            if choose is not None:
                chosen = choose(block, hinv_diag, i)
                if chosen is not None:
                    keep_block[:, i : i + chosen.shape[1]] = chosen
            col = block[:, i]  # (d_out,)
            if grid is None:
                q = torch.where(keep_block[:, i], col, torch.zeros_like(col))
                out[:, j] = q
            else:
                g = grid.col_group[j]
                if not grid.static and j % grid.group_size == 0:
                    cols = _current_group(weight, block, errors, hinv, i1, i, grid.group_size)
                    cols = torch.where(keep[:, j : j + grid.group_size], cols, torch.zeros_like(cols))
                    grid.scales[:, g], grid.zeros[:, g] = quant_params(cols, grid.spec, grid.scale_dtype)
                scale, zero = grid.scales[:, g], grid.zeros[:, g]
                code = torch.where(keep_block[:, i], quantize_to_codes(col, scale, zero, grid.maxq), zero)
                q = dequantize_codes(code, scale, zero)
                out[:, j] = code
            err = (col - q) / hinv_diag[i]  # (d_out,)
            block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1.0)
            errors[:, i] = err
        weight[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of later blocks
    return out


def _current_group(
    weight: Tensor, block: Tensor, errors: Tensor, hinv: Tensor, i1: int, i: int, gs: int
) -> Tensor:
    """Up-to-date values of the group starting at block column i (d_out, gs), including the updates
    still pending from this block's first i columns for the part that lies beyond the block."""
    count = block.shape[1]
    inside = block[:, i : min(count, i + gs)]
    outside = gs - inside.shape[1]
    if outside == 0:
        return inside
    i2 = i1 + count
    pending = errors[:, :i] @ hinv[i1 : i1 + i, i2 : i2 + outside]  # (d_out, outside)
    return torch.cat([inside, weight[:, i2 : i2 + outside] - pending], dim=1)


def gptq_quantize(
    w: Tensor, gram: Tensor, spec: QuantSpec, name: str = "", *, mask: Tensor | None = None
) -> QuantizedWeight:
    """GPTQ-quantize w (d_out, d_in) against gram = E[x x^T] (d_in, d_in).

    mask (d_out, d_in) bool, True = keep: masked entries end exactly 0 (code = zero point) and the
    error of forcing them there is compensated like quantization error, so w may be the pruned or
    the original weight. act_order visits columns by descending diag(H) with static groups.
    """
    weight, hessian = prepare(w, gram, name)
    keep = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(weight.device).clone()
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)  # (d_in,)
    grid = new_grid(spec, torch.where(keep, weight, torch.zeros_like(weight)), w.dtype, perm)
    if perm is not None:
        weight, keep = weight[:, perm], keep[:, perm]
        hessian = hessian[perm][:, perm]
    hinv = inverse_hessian_cholesky(hessian, spec.damp, name)
    codes = obs_sweep(weight, hinv, spec.block_size, grid, keep)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    result = pack_result(codes, grid.scales, grid.zeros, grid.group_size, spec.bits, w.dtype)
    check_finite(result.weight, "quantized weight", name)
    return result
