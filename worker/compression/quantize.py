"""Uniform integer grids for weights: group parameters, round-to-nearest, and the shared dequant rule.

Convention (GPTQ / compressed-tensors style, unsigned codes):
    weight[:, j] = (codes[:, j] - zeros[:, g]) * scales[:, g],   g = j // group_size
with codes in 0..2^bits-1 and integer zero points, so the value 0 is always exactly representable
(code == zero point). Scales are rounded to the weight's dtype before any code is chosen, so a
checkpoint that stores scales in that dtype re-derives exactly the same codes and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from worker.compression.specs import QuantSpec

ALLOWED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizedWeight:
    weight: Tensor  # (d_out, d_in) dequantized, in the input weight's dtype
    codes: Tensor  # (d_out, d_in) uint8, unsigned codes 0..2^bits-1
    scales: Tensor  # (d_out, n_groups) in the input weight's dtype
    zeros: Tensor  # (d_out, n_groups) uint8 integer zero points (symmetric: 2^(bits-1))
    group_size: int  # effective: d_in when the spec asked for per-channel (-1)
    bits: int


def effective_group_size(spec: QuantSpec, d_in: int) -> int:
    """Validate bits and group size against d_in; -1 (per channel) becomes d_in."""
    if spec.bits not in ALLOWED_BITS:
        raise ValueError(f"bits={spec.bits} is not supported; use one of {ALLOWED_BITS}")
    if spec.group_size == -1:
        return d_in
    if spec.group_size <= 0 or d_in % spec.group_size != 0:
        # compressed-tensors stores one scale per equal-sized group; a ragged last group cannot export.
        raise ValueError(
            f"group_size={spec.group_size} does not divide d_in={d_in}; choose a divisor of {d_in} "
            "or -1 for one group per output row"
        )
    return spec.group_size


def quant_params(
    w_group_cols: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point for one group of columns.

    w_group_cols: (d_out, cols). Returns (scales (d_out,), zeros (d_out,)), both fp32; zeros hold
    integers. The range always includes 0 (as in GPTQ), so 0 maps to the zero point exactly.
    scale_dtype rounds the scales to the dtype they will be stored in.
    """
    maxq = 2**spec.bits - 1
    x = w_group_cols.float()
    xmin = x.min(dim=1).values.clamp(max=0.0)  # (d_out,)
    xmax = x.max(dim=1).values.clamp(min=0.0)  # (d_out,)
    if spec.symmetric:
        amax = torch.maximum(xmax, -xmin)
        scales = 2.0 * amax / maxq
        zeros = torch.full_like(scales, float(2 ** (spec.bits - 1)))
    else:
        scales = (xmax - xmin) / maxq
        zeros = None
    # An all-zero row would give scale 0 and 0/0 codes; any positive scale represents it exactly.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    if scale_dtype is not None and scale_dtype != torch.float32:
        tiny = torch.finfo(scale_dtype).tiny  # keep the rounded scale normal (no underflow to 0)
        scales = scales.clamp(min=tiny).to(scale_dtype).float()
    if zeros is None:
        zeros = torch.round(-xmin / scales).clamp(0, maxq)
    return scales, zeros


def group_params(
    w: Tensor, spec: QuantSpec, group_size: int, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """quant_params for every group of w (d_out, d_in) at once: (scales, zeros), each (d_out, n_groups)."""
    d_out, d_in = w.shape
    n_groups = d_in // group_size
    grouped = w.reshape(d_out * n_groups, group_size)  # row-major: all groups of row 0 first
    scales, zeros = quant_params(grouped, spec, scale_dtype)
    return scales.reshape(d_out, n_groups), zeros.reshape(d_out, n_groups)


def quantize_to_codes(w: Tensor, scales: Tensor, zeros: Tensor, maxq: int) -> Tensor:
    """Codes (fp32 holding integers) of w given broadcastable scales/zeros, e.g. one column (d_out,)."""
    return torch.clamp(torch.round(w.float() / scales) + zeros, 0, maxq)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """fp32 values of codes; the single formula every path uses, so weights and codes agree bitwise."""
    return (codes.float() - zeros) * scales


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """(d_out, d_in) fp32 weight from codes (d_out, d_in) and group params (d_out, n_groups)."""
    d_out, d_in = codes.shape
    g = d_in // group_size
    grouped = codes.float().reshape(d_out, g, group_size)  # (d_out, n_groups, group_size)
    out = dequantize_codes(grouped, scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1))
    return out.reshape(d_out, d_in)


def pack_result(
    codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int, dtype: torch.dtype
) -> QuantizedWeight:
    """Build a QuantizedWeight whose weight is recomputed from its codes (consistent by construction)."""
    weight = dequantize(codes, scales, zeros, group_size).to(dtype)
    return QuantizedWeight(
        weight=weight,
        codes=codes.to(torch.uint8),
        scales=scales.to(dtype),
        zeros=zeros.to(torch.uint8),
        group_size=group_size,
        bits=bits,
    )


def quantize_rtn(w: Tensor, spec: QuantSpec, mask: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest group quantization of w (d_out, d_in).

    mask (d_out, d_in) bool, True = keep: pruned entries are set to 0 before quantizing, so their
    code is the zero point and they dequantize to exactly 0 whatever their current value.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    gs = effective_group_size(spec, w.shape[1])
    maxq = 2**spec.bits - 1
    x = w.float()
    if mask is not None:
        x = torch.where(mask, x, torch.zeros_like(x))
    scales, zeros = group_params(x, spec, gs, scale_dtype=w.dtype)  # (d_out, n_groups)
    codes = quantize_to_codes(
        x, scales.repeat_interleave(gs, dim=1), zeros.repeat_interleave(gs, dim=1), maxq
    )  # (d_out, d_in)
    return pack_result(codes, scales, zeros, gs, spec.bits, w.dtype)
