"""Apply the compression specs to one Linear weight given its Gram matrix, and the compensated Linear.

The sequential pipeline owns the layer loop and the hooks; this module is the step in between: for
one weight (d_out, d_in) and its calibration Gram S = X^T X / N (d_in, d_in), prune -> quantize ->
compute the low-rank compensation of what was lost, and measure the relative output error
||(W - W') X|| / ||W X|| from S alone (no extra forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch
from torch import Tensor, nn

from worker.compression.adapters import adapter_group_size, quantize_adapter
from worker.compression.eora import eora, eora_decompose, svd_baseline, svd_decompose
from worker.compression.gptq import gptq_quantize
from worker.compression.prune import prune
from worker.compression.quantize import QuantizedWeight, quantize_rtn
from worker.compression.sparsegpt import sparsegpt_prune
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec

ADAPTER_BYTES_PER_PARAM = 2  # adapters are stored in fp16 unless adapter_bits quantizes them
SCALE_BYTES = 2  # fp16 scale per adapter quantization group


@dataclass
class CompressedWeight:
    weight: Tensor  # (d_out, d_in) in the input weight's dtype: pruned and/or on the quantization grid
    quantized: QuantizedWeight | None  # codes/scales/zeros when a quantizer ran
    mask: Tensor | None  # (d_out, d_in) bool, True = kept, when a pruner ran
    seconds: float


def compress_weight(
    weight: Tensor,
    gram: Tensor,
    quant: QuantSpec | None,
    sparsity: SparsitySpec | None,
    name: str,
) -> CompressedWeight:
    """Prune, then quantize, one weight (d_out, d_in) with its Gram (d_in, d_in) fp64.

    SparseGPT with GPTQ runs as one joint sweep (the EoRA paper's "2:4 + 4-bit" setting); any other
    pruner is followed by the quantizer, which keeps the pruned entries at exactly zero.
    """
    start = perf_counter()
    mask = None
    quantized = None
    joint = sparsity is not None and sparsity.method == "sparsegpt" and quant is not None and quant.method == "gptq"
    if joint:
        new_weight, mask, quantized = sparsegpt_prune(weight, gram, sparsity, quant=quant, name=name)
    else:
        new_weight = weight
        if sparsity is not None:
            new_weight, mask = prune(new_weight, gram, sparsity, name=name)
        if quant is not None:
            if quant.method == "gptq":
                quantized = gptq_quantize(new_weight, gram, quant, name=name, mask=mask)
            else:
                quantized = quantize_rtn(new_weight, quant, mask=mask)
            new_weight = quantized.weight
    new_weight = new_weight.to(weight.dtype)
    if not torch.isfinite(new_weight).all():
        raise FloatingPointError(f"{name}: compressed weight has non-finite values")
    return CompressedWeight(new_weight, quantized, mask, perf_counter() - start)


def compensation_factors(
    residual: Tensor, gram: Tensor, spec: CompensationSpec, rank: int, name: str
) -> tuple[Tensor, Tensor]:
    """(B (d_out, r), A (r, d_in)) fp32 with B A ~ residual = W - W', by EoRA or plain SVD.

    With spec.adapter_bits, A and B are fake-quantized group-wise and the dequantized values are
    returned, so evaluation sees exactly what a quantized adapter computes.
    """
    if spec.method == "eora":
        lora_b, lora_a = eora(residual, gram, rank, name=name, damp=spec.damp)
    else:
        lora_b, lora_a = svd_baseline(residual, gram, rank, name=name)
    if spec.adapter_bits is not None:
        lora_b = quantize_adapter(lora_b, spec.adapter_bits, spec.adapter_group_size)
        lora_a = quantize_adapter(lora_a, spec.adapter_bits, spec.adapter_group_size)
    lora_b, lora_a = lora_b.float(), lora_a.float()
    if not (torch.isfinite(lora_b).all() and torch.isfinite(lora_a).all()):
        raise FloatingPointError(f"{name}: compensation factors have non-finite values")
    return lora_b, lora_a


def compensation_spectrum(residual: Tensor, gram: Tensor, spec: CompensationSpec, name: str) -> Tensor:
    """(p,) fp32 descending singular values of the decomposition compensation_factors cuts: sigma_i^2
    is what its i-th rank removes from the objective it minimises (EoRA: calibration-weighted error
    under the damped Gram; SVD: Frobenius error). The rank budget spends parameters by them."""
    if spec.method == "eora":
        return eora_decompose(residual, gram, name, damp=spec.damp).singular_values
    return svd_decompose(residual, name).singular_values


def objective_norm(weight: Tensor, gram: Tensor, spec: CompensationSpec) -> float:
    """||W|| in the norm of that objective (EoRA: sqrt(tr(W (S + damp mean(diag S) I) W^T)); SVD:
    ||W||_F), so that sigma_i / objective_norm is the relative error a rank unit removes."""
    w = weight.double()
    frobenius = float(w.square().sum())
    if spec.method != "eora":
        return frobenius**0.5
    g = gram.double()
    weighted = float((w @ g * w).sum())  # tr(W S W^T)
    return (weighted + spec.damp * float(g.diagonal().mean()) * frobenius) ** 0.5


def adapter_size(d_out: int, d_in: int, rank: int, spec: CompensationSpec) -> tuple[int, int]:
    """(parameters, bytes) of a rank-r adapter at its stored precision.

    fp16: 2 bytes per parameter. adapter_bits: codes packed at adapter_bits each, plus per group
    (quantize_adapter's groups along each factor's last dim) an fp16 scale and a packed zero point.
    """
    params = rank * (d_out + d_in)
    if spec.adapter_bits is None:
        return params, params * ADAPTER_BYTES_PER_PARAM
    if rank == 0:
        return 0, 0
    groups = d_out * (rank // adapter_group_size(rank, spec.adapter_group_size))  # B (d_out, r)
    groups += rank * (d_in // adapter_group_size(d_in, spec.adapter_group_size))  # A (r, d_in)
    packed_bits = (params + groups) * spec.adapter_bits  # codes and zero points
    return params, _ceil_div(packed_bits, 8) + groups * SCALE_BYTES


def relative_output_error(residual: Tensor, weight: Tensor, gram: Tensor) -> float:
    """||dW X^T||_F / ||W X^T||_F from the Gram S = X^T X / N: sqrt(tr(dW S dW^T) / tr(W S W^T)).

    residual, weight: (d_out, d_in); gram: (d_in, d_in), used in fp32 (a ratio of two norms needs no
    more). The token count N cancels.
    """
    residual = residual.float()
    weight = weight.float()
    gram = gram.float()
    err = (residual @ gram * residual).sum(dtype=torch.float64)  # tr(dW S dW^T)
    ref = (weight @ gram * weight).sum(dtype=torch.float64)  # tr(W S W^T)
    if ref <= 0:
        return 0.0 if err <= 0 else float("inf")
    return float(torch.sqrt(err.clamp(min=0) / ref))


class CompensatedLinear(nn.Module):
    """A compressed Linear plus its low-rank residual path: base(x) + B (A x).

    lora_A (r, d_in) and lora_B (d_out, r) are fp32 buffers (not trained); the low-rank product runs
    in fp32 and is cast back to the input dtype.
    """

    def __init__(self, base: nn.Linear, lora_b: Tensor, lora_a: Tensor):
        super().__init__()
        if lora_b.shape != (base.out_features, lora_a.shape[0]) or lora_a.shape[1] != base.in_features:
            raise ValueError(
                f"adapter shapes B {tuple(lora_b.shape)}, A {tuple(lora_a.shape)} do not fit a Linear "
                f"({base.out_features}, {base.in_features})"
            )
        self.base = base
        self.register_buffer("lora_A", lora_a.detach().float())  # (r, d_in)
        self.register_buffer("lora_B", lora_b.detach().float())  # (d_out, r)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        low_rank = (x.float() @ self.lora_A.T) @ self.lora_B.T  # (..., d_out) fp32
        # Add in fp32 and round once, as PEFT's LoRA layer does, so the exported adapter reproduces it exactly.
        return (self.base(x) + low_rank).to(x.dtype)


def attach_compensation(root: nn.Module, name: str, lora_b: Tensor, lora_a: Tensor) -> CompensatedLinear:
    """Replace the Linear at dotted `name` under root by a CompensatedLinear around it."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    base = getattr(parent, child)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
    wrapped = CompensatedLinear(base, lora_b, lora_a)
    setattr(parent, child, wrapped)
    return wrapped


def unwrap_adapters(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Put the plain Linears back and return {full module name: (B (d_out, r), A (r, d_in))}.

    The names are those of the Linears ("model.layers.0.self_attn.q_proj"), as PEFT's target
    modules and rank_pattern keys want them.
    """
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, CompensatedLinear)]
    adapters = {}
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
        adapters[name] = (module.lora_B, module.lora_A)
    return adapters


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
