"""Fake quantization of adapter factors (CompensationSpec.adapter_bits): RTN, asymmetric, group-wise
along the last dimension, returned dequantized so the adapter is stored and applied in float.
"""

from __future__ import annotations

from torch import Tensor

from worker.compression.quantize import quantize_rtn
from worker.compression.specs import QuantSpec


def adapter_group_size(dim: int, group_size: int) -> int:
    """Largest divisor of dim that is <= group_size (dim itself when dim <= group_size).

    Adapter dims are ranks (any integer) and d_in; equal groups keep the scheme regular. A prime
    dim above group_size degenerates to groups of 1 (lossless, and as costly as fp16 scales).
    """
    if group_size <= 0:
        raise ValueError(f"adapter group size must be positive, got {group_size}")
    for size in range(min(dim, group_size), 0, -1):
        if dim % size == 0:
            return size
    return 1


def quantize_adapter(t: Tensor, bits: int, group_size: int) -> Tensor:
    """Dequantized RTN copy of t (rows, dim) in t's dtype; groups run along the last dim."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D adapter factor, got shape {tuple(t.shape)}")
    if t.shape[1] == 0 or t.shape[0] == 0:
        return t.clone()
    gs = adapter_group_size(t.shape[1], group_size)
    spec = QuantSpec(method="rtn", bits=bits, group_size=gs, symmetric=False, damp=0.0, act_order=False)  # RTN: no Hessian
    return quantize_rtn(t, spec).weight
