"""What each way of storing one Linear would cost and lose: the size target's error curves.

For one weight W (d_out, d_in) with its calibration Gram S = X^T X / N (d_in, d_in), every candidate
(a quantizer, an adapter rank, an adapter precision) gets
- its stored bytes, from the formulas the export's files are held to: compressed-tensors'
  pack-quantized layout (worker.export.sizes.pack_quantized_bytes) and the adapter file
  (worker.linear_compress.adapter_size), or the adapter at fp16 where an engine holds it so;
- its calibration-weighted output error tr(R S R^T) = ||R X^T||_F^2 / N, R = W - Wc - B A, with Wc from
  the compressor the job would run (compress_weight: RTN is the cheap proxy a caller picks by the
  spec's method; GPTQ costs one sweep per candidate) and B A the adapter in its stored form (fp16 or
  quantized) cut from ONE decomposition of W - Wc per quantizer (leading_factors: the leading directions of
  linear_compress.compensation_decomposition's, in the orientation the run stores), so the whole rank curve
  costs one eigendecomposition and, per adapter precision, one set of products with the largest A
  (_ErrorCurve.prefix): every smaller rank reads the first r rows of those.
The errors are absolute (not relative to ||W X||): summed over modules they are the total squared
output error the allocator trades against bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from worker.compression.adapters import stored_factor
from worker.compression.eora import Eigenspace, canonical_signs, gram_eigenspace, project, real_rtol
from worker.compression.gptq import check_finite
from worker.compression.ranks import rank_cap
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.export.sizes import pack_quantized_bytes
from worker.linear_compress import adapter_served_bytes, adapter_size, compress_weight


@dataclass(frozen=True)
class Option:
    """One way to store a Linear, what it takes and what it loses."""

    quant: QuantSpec
    rank: int  # the adapter's true rank (0: none)
    adapter_bits: int | None  # None: fp16 factors
    bytes: int  # stored bytes (adapter: as stored, or at fp16 when served bytes are counted)
    error: float  # tr(R S R^T), R = W - Wc - B A


def measure_options(weight: Tensor, gram: Tensor, quants: Sequence[QuantSpec], sparsity: SparsitySpec | None,
                    compensation: CompensationSpec | None, ranks: Sequence[int], adapter_bits: Sequence[int | None],
                    name: str, space: Eigenspace | None = None, served_adapters: bool = False,
                    compensate_gram: Tensor | None = None, scale_bytes: int | None = None) -> list[Option]:
    """Every (quantizer, rank, adapter precision) option of weight (d_out, d_in) under gram (d_in, d_in).

    ranks: adapter ranks to try (0 = no adapter; those at or above rank_cap are left out, and a rank
    beyond the error's real directions gives the true, smaller rank once); compensation: the method,
    damp and adapter group size the adapters are made with (its own rank fields are not used), None
    for no adapters. compensate_gram: the Gram the adapters are fitted on when it is not `gram` (sink
    tokens left out), space: compensation_eigenspace of it when the caller has it. served_adapters: count
    adapters at fp16 whatever they are stored in (engines that hold them so, e.g. vLLM). scale_bytes: what
    a stored scale is counted at (None: the weight's dtype, as the export stores it).
    """
    d_out, d_in = weight.shape
    scale_bytes = scale_bytes or weight.element_size()
    options = []
    products = gram.float()  # the fp32 Gram every _ErrorCurve of this Linear multiplies by
    for quant in quants:
        residual = weight.float() - compress_weight(weight, gram, quant, sparsity, name).weight.float()  # (d_out, d_in)
        base = sum(pack_quantized_bytes(d_out, d_in, quant.bits, quant.group_size, quant.symmetric,
                                        scale_bytes).values())
        curve = _ErrorCurve(residual, products)
        if 0 in ranks or compensation is None:
            options.append(Option(quant, 0, None, base, curve.alone))
        useful = sorted({r for r in ranks if 0 < r <= rank_cap(d_out, d_in)})
        if compensation is None or not useful:
            continue
        fitted_on = gram if compensate_gram is None else compensate_gram
        lora_b, lora_a = leading_factors(residual, fitted_on, compensation, max(useful), name, space)
        ranks_made = sorted({min(r, lora_a.shape[0]) for r in useful} - {0})  # beyond the real directions: once
        for bits in adapter_bits if ranks_made else ():  # none: the compression left no error to compensate
            spec = replace(compensation, adapter_bits=bits)
            prefix = curve.prefix(stored_factor(lora_a, bits, spec.adapter_group_size, name))
            for r in ranks_made:  # B's groups run along r: stored per rank
                params, stored = adapter_size(d_out, d_in, r, spec)
                extra = adapter_served_bytes(params) if served_adapters else stored
                error = prefix.error(stored_factor(lora_b[:, :r], bits, spec.adapter_group_size, name))
                options.append(Option(quant, r, bits, base + extra, error))
    return options


def leading_factors(residual: Tensor, gram: Tensor, spec: CompensationSpec, rank: int, name: str,
                    space: Eigenspace | None = None) -> tuple[Tensor, Tensor]:
    """B (d_out, r), A (r, d_in) fp32: the leading r directions of the decomposition the run cuts
    (linear_compress.compensation_decomposition: EoRA's projected error P = dW Q diag(sqrt l), or dW for
    SVD), r = min(rank, its real directions); a rank-r' adapter is B[:, :r'] A[:r'].

    From the eigendecomposition of the smaller Gram of P (P P^T or P^T P, fp64) instead of P's SVD: the
    same factors to rounding, for the many decompositions the curves take, in a fraction of the time (at
    one thread, 576 x 1536: 61 ms for the Gram and its eigh against 223 ms for the SVD). Squaring P
    resolves its singular values only above sqrt(m eps) sigma_1 (m: the Gram's size), so directions below
    that are taken as absent, besides those _real_directions drops; each would remove less than
    m eps sigma_1^2 from the objective.
    """
    check_finite(residual, "weight error", name)
    back: Tensor | None
    if spec.method == "eora":
        projected, back = project(residual, space or gram_eigenspace(gram, name, spec.damp))  # (d_out, k), (k, d_in)
    else:
        projected, back = residual.double(), None
    wide = projected.shape[0] <= projected.shape[1]
    small = projected @ projected.T if wide else projected.T @ projected  # (m, m)
    values, vectors = torch.linalg.eigh(small)  # ascending
    sigma = values.flip(0).clamp(min=0.0).sqrt()  # (m,) descending
    rtol = max(real_rtol(projected.shape, residual.dtype), (small.shape[0] * torch.finfo(torch.float64).eps) ** 0.5)
    r = min(rank, int((sigma > sigma[0] * rtol).sum())) if sigma.numel() and sigma[0] > 0 else 0
    vectors, root = vectors.flip(1)[:, :r], sigma[:r].sqrt()  # P = U diag(sigma) V^T: U or V, sqrt(sigma)
    if wide:  # vectors = U: B = U sqrt(sigma), A = sqrt(sigma) V^T = U^T P / sqrt(sigma)
        b, a = vectors * root, (vectors.T @ projected) / root.unsqueeze(1)
    else:  # vectors = V: B = P V / sqrt(sigma), A = sqrt(sigma) V^T
        b, a = (projected @ vectors) / root, root.unsqueeze(1) * vectors.T
    signs = canonical_signs(b)  # B = U sqrt(sigma): the orientation the run's decomposition stores
    b, a = b * signs, a * signs.unsqueeze(1)
    if back is not None:
        a = a @ back  # (r, d_in)
    return b.float(), a.float()


class _ErrorCurve:
    """tr((dW - B A) S (dW - B A)^T) = tr(dW S dW^T) - 2 tr(B A S dW^T) + tr(B A S A^T B^T), for every adapter
    cut from one A (R, d_in): its rank-r adapter uses A's first r rows.

    The products (the O(d_in^2) work) run in fp32 and are summed in fp64: each term is then good to about
    1e-6 of tr(dW S dW^T). On SmolLM2's first four layers every option's error is within 2.5e-4 of the fp64
    products' (the worst: an adapter leaving 0.26 % of its quantizer's error) and 1.2e-6 of that error
    alone, far below the steps between neighbouring options. The fp64 products took a quarter of the
    measurement's time (52.0 vs 39.6 s there, one thread)."""

    def __init__(self, residual: Tensor, gram: Tensor):
        self.residual = residual.float()  # (d_out, d_in)
        self.gram = gram  # (d_in, d_in) fp32, converted once per Linear by measure_options
        self.alone = float((self.residual @ self.gram * self.residual).sum(dtype=torch.float64))  # tr(dW S dW^T)

    def prefix(self, lora_a: Tensor) -> _Prefix:
        """The products of A (R, d_in) that every rank's error reads: O(R d_in (d_in + d_out)), once."""
        a = lora_a.float()
        a_gram = a @ self.gram  # (R, d_in)
        return _Prefix(self.alone, a_gram @ self.residual.T, a_gram @ a.T)  # (R, d_out), (R, R)


@dataclass(frozen=True)
class _Prefix:
    alone: float
    cross: Tensor  # (R, d_out) fp32: A S dW^T
    quadratic: Tensor  # (R, R) fp32: A S A^T

    def error(self, lora_b: Tensor) -> float:
        """The error with B (d_out, r) and A's first r rows, at O(d_out r^2) (fp32 products, fp64 sums)."""
        b = lora_b.float()
        r = b.shape[1]
        cross = float((self.cross[:r] * b.T).sum(dtype=torch.float64))  # tr(B A S dW^T)
        quadratic = float(((b.T @ b) * self.quadratic[:r, :r]).sum(dtype=torch.float64))  # tr(B (A S A^T) B^T)
        return max(self.alone - 2.0 * cross + quadratic, 0.0)
