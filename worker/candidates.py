"""What each way of storing one Linear would cost and lose: the size target's error curves.

For one weight W (d_out, d_in) with its calibration Gram S = X^T X / N (d_in, d_in), every candidate
(a quantizer, an adapter rank, an adapter precision) gets
- its stored bytes, from the formulas the export's files are held to: compressed-tensors'
  pack-quantized layout (worker.export.sizes.pack_quantized_bytes) and the adapter file
  (worker.linear_compress.adapter_size), or the adapter at fp16 where an engine holds it so;
- its calibration-weighted output error tr(R S R^T) = ||R X^T||_F^2 / N, R = W - Wc - B A, with Wc from
  the compressor the job would run (compress_weight: RTN is the cheap proxy a caller picks by the
  spec's method; GPTQ costs one sweep per candidate) and B A the adapter in its stored form (fp16 or
  quantized) cut from ONE decomposition of W - Wc per quantizer (linear_compress.compensation_decomposition),
  so the whole rank curve costs one eigenspace-projected SVD.
The errors are absolute (not relative to ||W X||): summed over modules they are the total squared
output error the allocator trades against bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from worker.compression.adapters import LowRankAdapter, stored_adapter
from worker.compression.eora import Eigenspace
from worker.compression.ranks import rank_cap
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.export.sizes import pack_quantized_bytes
from worker.linear_compress import adapter_served_bytes, adapter_size, compensation_decomposition, compress_weight


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
    for quant in quants:
        residual = weight.float() - compress_weight(weight, gram, quant, sparsity, name).weight.float()  # (d_out, d_in)
        base = sum(pack_quantized_bytes(d_out, d_in, quant.bits, quant.group_size, quant.symmetric,
                                        scale_bytes).values())
        curve = _ErrorCurve(residual, gram)
        if 0 in ranks or compensation is None:
            options.append(Option(quant, 0, None, base, curve.alone))
        useful = sorted({r for r in ranks if 0 < r <= rank_cap(d_out, d_in)})
        if compensation is None or not useful:
            continue
        fitted_on = gram if compensate_gram is None else compensate_gram
        factors = compensation_decomposition(residual, fitted_on, compensation, name, space)
        for bits in adapter_bits:
            spec = replace(compensation, adapter_bits=bits)
            seen = set()
            for rank in useful:
                adapter = stored_adapter(*factors.lowrank(rank), bits, spec.adapter_group_size, name)
                if adapter.rank == 0 or adapter.rank in seen:
                    continue
                seen.add(adapter.rank)
                params, stored = adapter_size(d_out, d_in, adapter.rank, spec)
                extra = adapter_served_bytes(params) if served_adapters else stored
                options.append(Option(quant, adapter.rank, bits, base + extra, curve.error(adapter)))
    return options


class _ErrorCurve:
    """tr((dW - B A) S (dW - B A)^T) = tr(dW S dW^T) - 2 tr(B A S dW^T) + tr(B A S A^T B^T), at
    O(r d_in (d_in + d_out)) per adapter instead of O(d_out d_in^2); fp64."""

    def __init__(self, residual: Tensor, gram: Tensor):
        self.residual = residual.double()  # (d_out, d_in)
        self.gram = gram.double()  # (d_in, d_in)
        self.alone = float((self.residual @ self.gram * self.residual).sum())  # tr(dW S dW^T)

    def error(self, adapter: LowRankAdapter) -> float:
        b, a = adapter.lora_b.double(), adapter.lora_a.double()  # (d_out, r), (r, d_in)
        a_gram = a @ self.gram  # (r, d_in)
        cross = float(((a_gram @ self.residual.T) * b.T).sum())  # tr(B A S dW^T)
        quadratic = float(((b.T @ b) * (a_gram @ a.T)).sum())  # tr(B (A S A^T) B^T)
        return max(self.alone - 2.0 * cross + quadratic, 0.0)
