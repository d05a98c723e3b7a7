"""Adapter factors as they are stored: fp16 values, or group-wise integer codes (adapter_bits).

FACTOR_DTYPE is what the service stores, evaluates and exports: fp16 (the precision vLLM serves
LoRA weights in for fp16 models and PEFT loads as given; 11 significant bits against bf16's 8 for
the same 2 bytes, and low-rank factors sit far inside fp16's range). With adapter_bits, each
factor is RTN-quantized, asymmetric, group-wise along its last dimension, with fp16 scales; its
values are dequantize() of the stored codes, computed one way everywhere (fp32 product, rounded
once to fp16), so the in-memory model and a reloaded adapter hold the same numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from worker.compression.quantize import dequantize, quantize_rtn
from worker.compression.specs import QuantSpec

FACTOR_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantizedFactor:
    codes: Tensor  # (rows, dim) uint8, unsigned 0..2^bits-1
    scales: Tensor  # (rows, n_groups) fp16
    zeros: Tensor  # (rows, n_groups) uint8 integer zero points
    group_size: int
    bits: int

    def dequantize(self) -> Tensor:
        """(rows, dim) FACTOR_DTYPE: (codes - zeros) * scales in fp32, rounded once."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size).to(FACTOR_DTYPE)


@dataclass(frozen=True)
class LowRankAdapter:
    """One module's compensation as stored: B (d_out, r), A (r, d_in) in FACTOR_DTYPE, and their
    integer form when adapter_bits quantized them (then B, A are its dequantized values)."""

    lora_b: Tensor
    lora_a: Tensor
    quantized: tuple[QuantizedFactor, QuantizedFactor] | None = None  # (B, A)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta(self) -> Tensor:
        """B A (d_out, d_in) fp32: what the adapter adds to the weight."""
        return self.lora_b.float() @ self.lora_a.float()


def stored_adapter(lora_b: Tensor, lora_a: Tensor, bits: int | None, group_size: int, name: str) -> LowRankAdapter:
    """The stored form of float factors B (d_out, r), A (r, d_in): rounded to FACTOR_DTYPE, or
    quantized to `bits` in groups of up to `group_size`. Raises if a value leaves fp16's range."""
    if bits is None or lora_a.shape[0] == 0:  # rank 0 (nothing to compensate): no codes to make
        adapter = LowRankAdapter(lora_b.to(FACTOR_DTYPE), lora_a.to(FACTOR_DTYPE))
    else:
        qb, qa = quantize_adapter(lora_b, bits, group_size), quantize_adapter(lora_a, bits, group_size)
        adapter = LowRankAdapter(qb.dequantize(), qa.dequantize(), (qb, qa))
    _check_finite(name, adapter.lora_b, adapter.lora_a)
    return adapter


def stored_factor(factor: Tensor, bits: int | None, group_size: int, name: str) -> Tensor:
    """The values stored_adapter stores for one non-empty factor (rows, dim), without its codes: rows are
    stored independently (groups run along dim), so A's first r rows are stored as A cut at rank r."""
    values = factor.to(FACTOR_DTYPE) if bits is None else quantize_adapter(factor, bits, group_size).dequantize()
    _check_finite(name, values)
    return values


def _check_finite(name: str, *factors: Tensor) -> None:
    if not all(bool(torch.isfinite(f).all()) for f in factors):
        raise FloatingPointError(f"{name}: compensation factors are not finite in {FACTOR_DTYPE} "
                                 "(values beyond its range; a larger damp keeps them bounded)")


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


def quantize_adapter(t: Tensor, bits: int, group_size: int) -> QuantizedFactor:
    """RTN codes of t (rows, dim), groups along the last dim, scales rounded to fp16 before any
    code is chosen (so the stored scales re-derive exactly these codes)."""
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D adapter factor, got shape {tuple(t.shape)}")
    gs = adapter_group_size(t.shape[1], group_size)
    spec = QuantSpec(method="rtn", bits=bits, group_size=gs, symmetric=False, damp=0.0, act_order=False)  # RTN: no Hessian
    q = quantize_rtn(t.to(FACTOR_DTYPE), spec)  # fp16 in, fp16 scales out
    return QuantizedFactor(codes=q.codes, scales=q.scales.to(FACTOR_DTYPE), zeros=q.zeros, group_size=gs, bits=bits)
