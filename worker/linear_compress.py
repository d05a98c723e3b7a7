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

from worker.compression.adapters import FACTOR_DTYPE, LowRankAdapter, adapter_group_size, stored_adapter
from worker.compression.eora import Eigenspace, LowRankFactors, eora_decompose, gram_eigenspace, svd_decompose
from worker.compression.gptq import gptq_quantize
from worker.compression.prune import prune
from worker.compression.quantize import QuantizedWeight, quantize_rtn
from worker.compression.sparsegpt import sparsegpt_prune
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec

ADAPTER_BYTES_PER_PARAM = FACTOR_DTYPE.itemsize  # adapters are stored in fp16 unless adapter_bits quantizes them
SCALE_BYTES = FACTOR_DTYPE.itemsize  # one fp16 scale per adapter quantization group
SERVED_BYTES_PER_PARAM = 2  # vLLM holds LoRA weights in fp16/bf16 whatever the file stores


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


def compress_jointly(
    weight: Tensor,
    gram: Tensor,
    quant: QuantSpec | None,
    sparsity: SparsitySpec | None,
    spec: CompensationSpec,
    rank: int,
    name: str,
    compensate_gram: Tensor | None = None,
    space: Eigenspace | None = None,
) -> tuple[CompressedWeight, list[float]]:
    """Joint compression and compensation of one weight (d_out, d_in): spec.refine rounds of
    compress(W - BA) with the same Gram, then BA refit on what that compression lost.

    Round 0 is compress-then-compensate. Each round's calibration error ||(W - W' - BA) X|| / ||W X||
    is measured on gram (as error_after is); the compressed weight W' of the round with the least
    error is returned with every round's error (round 0 first). Its adapter is what
    compensation_factors(W - W', ...) gives again (deterministic), so the caller compensates it as any
    other compressed weight. The seconds include the rounds' decompositions.
    compensate_gram, space: the compensation's Gram (sink tokens left out) and its eigenspace.
    """
    start = perf_counter()
    compensate_gram = gram if compensate_gram is None else compensate_gram
    compressed = compress_weight(weight, gram, quant, sparsity, name)
    best, errors = compressed, []
    for round_ in range(spec.refine + 1):
        residual = weight.float() - compressed.weight.float()  # (d_out, d_in)
        adapter = compensation_factors(residual, compensate_gram, spec, rank, name, space)
        errors.append(relative_output_error(residual - adapter.delta(), weight, gram))
        if errors[-1] < min(errors[:-1], default=float("inf")):
            best = compressed
        if round_ == spec.refine or adapter.rank == 0:
            break
        target = (weight.float() - adapter.delta()).to(weight.dtype)  # (d_out, d_in): W - BA as served
        compressed = compress_weight(target, gram, quant, sparsity, name)
    best.seconds = perf_counter() - start
    return best, errors


def compensation_eigenspace(gram: Tensor, spec: CompensationSpec, name: str) -> Eigenspace | None:
    """The Gram's eigendecomposition EoRA projects onto, made once per input group; None for SVD."""
    return gram_eigenspace(gram, name, damp=spec.damp) if spec.method == "eora" else None


def compensation_factors(
    residual: Tensor, gram: Tensor, spec: CompensationSpec, rank: int, name: str, space: Eigenspace | None = None
) -> LowRankAdapter:
    """B (d_out, r), A (r, d_in) with B A ~ residual = W - W', by EoRA or plain SVD, in their stored
    form: fp16, or with spec.adapter_bits group-wise integer codes and their dequantized fp16 values,
    so evaluation sees exactly what the exported adapter computes. space: compensation_eigenspace(gram).
    """
    lora_b, lora_a = compensation_decomposition(residual, gram, spec, name, space).lowrank(rank)
    if not (torch.isfinite(lora_b).all() and torch.isfinite(lora_a).all()):
        raise FloatingPointError(f"{name}: compensation factors have non-finite values")
    return stored_adapter(lora_b, lora_a, spec.adapter_bits, spec.adapter_group_size, name)


def compensation_decomposition(residual: Tensor, gram: Tensor, spec: CompensationSpec, name: str,
                               space: Eigenspace | None = None) -> LowRankFactors:
    """The decomposition of residual (d_out, d_in) that compensation_factors cuts at a rank: EoRA's
    eigenspace-projected SVD (space: compensation_eigenspace(gram)) or the plain SVD."""
    if spec.method == "eora":
        return eora_decompose(residual, gram, name, damp=spec.damp, space=space)
    return svd_decompose(residual, name)


def compensation_spectrum(residual: Tensor, gram: Tensor, spec: CompensationSpec, name: str,
                          space: Eigenspace | None = None) -> Tensor:
    """(p,) fp32 descending singular values of the decomposition compensation_factors cuts: sigma_i^2
    is what its i-th rank removes from the objective it minimises (EoRA: calibration-weighted error
    under the damped Gram; SVD: Frobenius error). The rank budget spends parameters by them."""
    return compensation_decomposition(residual, gram, spec, name, space).singular_values


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
    """(parameters, stored bytes) of a rank-r adapter, as worker.export.adapter writes it.

    fp16: 2 bytes per parameter. adapter_bits: per factor (B (d_out, r), A (r, d_in)) its codes and
    its zero points, each packed at adapter_bits into bytes, plus one fp16 scale per group
    (quantize_adapter's groups along the factor's last dim). Served size: adapter_served_bytes.
    """
    params = rank * (d_out + d_in)
    if spec.adapter_bits is None or rank == 0:
        return params, params * ADAPTER_BYTES_PER_PARAM
    stored = 0
    for rows, dim in ((d_out, rank), (rank, d_in)):
        groups = rows * (dim // adapter_group_size(dim, spec.adapter_group_size))
        stored += packed_bytes(rows * dim, spec.adapter_bits) + packed_bytes(groups, spec.adapter_bits)
        stored += groups * SCALE_BYTES
    return params, stored


def adapter_served_bytes(params: int) -> int:
    """Bytes an engine holds for an adapter of `params` parameters (vLLM: fp16, whatever is stored)."""
    return params * SERVED_BYTES_PER_PARAM


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` unsigned integers of `bits` bits packed densely (low bits first)."""
    return _ceil_div(count * bits, 8)


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

    lora_A (r, d_in) and lora_B (d_out, r) are fp16 buffers (not trained) holding exactly the values
    the exported adapter stores; the low-rank product runs in fp32 and the sum is rounded once to the
    input dtype. `quantized` keeps the integer form for the export when adapter_bits made one.
    """

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter):
        super().__init__()
        lora_b, lora_a = adapter.lora_b, adapter.lora_a
        if lora_b.shape != (base.out_features, lora_a.shape[0]) or lora_a.shape[1] != base.in_features:
            raise ValueError(
                f"adapter shapes B {tuple(lora_b.shape)}, A {tuple(lora_a.shape)} do not fit a Linear "
                f"({base.out_features}, {base.in_features})"
            )
        if lora_b.dtype != FACTOR_DTYPE or lora_a.dtype != FACTOR_DTYPE:
            raise TypeError(f"adapter factors must be {FACTOR_DTYPE} (their stored form), got {lora_b.dtype}")
        self.base = base
        self.register_buffer("lora_A", lora_a.detach())  # (r, d_in) fp16
        self.register_buffer("lora_B", lora_b.detach())  # (d_out, r) fp16
        self.quantized = adapter.quantized

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def adapter(self) -> LowRankAdapter:
        return LowRankAdapter(self.lora_B, self.lora_A, self.quantized)

    def forward(self, x: Tensor) -> Tensor:
        low_rank = (x.float() @ self.lora_A.float().T) @ self.lora_B.float().T  # (..., d_out) fp32
        # Add in fp32 and round once, as PEFT's LoRA layer does, so the exported adapter reproduces it exactly.
        return (self.base(x) + low_rank).to(x.dtype)


def attach_compensation(root: nn.Module, name: str, adapter: LowRankAdapter) -> CompensatedLinear:
    """Replace the Linear at dotted `name` under root by a CompensatedLinear around it."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    base = getattr(parent, child)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
    wrapped = CompensatedLinear(base, adapter)
    setattr(parent, child, wrapped)
    return wrapped


def unwrap_adapters(model: nn.Module) -> dict[str, LowRankAdapter]:
    """Put the plain Linears back and return {full module name: its stored adapter}.

    The names are those of the Linears ("model.layers.0.self_attn.q_proj"), as PEFT's target
    modules and rank_pattern keys want them.
    """
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, CompensatedLinear)]
    adapters = {}
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
        adapters[name] = module.adapter()
    return adapters


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
