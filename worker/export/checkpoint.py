"""The compressed checkpoint: compressed-tensors pack-quantized for quantized jobs, dense otherwise.

Quantized jobs: the service computed its own codes, scales and zero points (worker.compression),
and the in-memory model already holds the dequantized weights. compressed-tensors is told to use
exactly those: `apply_quantization_config` adds `weight_scale`/`weight_zero_point` to each target
Linear, they are overwritten with ours, and `ModelCompressor.compress_model` re-derives the integer
values from weight / scale + zero point and packs them into int32 (`weight_packed`). That
re-derivation is checked against our codes, module by module, before anything is written: a single
differing code fails the export.

Conventions: our codes and zero points are unsigned (0..2^bits-1, GPTQ style); compressed-tensors
stores signed values, so both shift by -2^(bits-1). A symmetric grid has its zero point at
2^(bits-1), i.e. signed 0, which compressed-tensors leaves out of the checkpoint.

Sparse-only jobs are saved dense-with-zeros as plain safetensors: compressed-tensors (0.19+) writes
no sparse formats, and transformers drops a `sparsity_config` on load. The sparsity is recorded in
squeeze.json instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from worker.compression.quantize import QuantizedWeight, dequantize
from worker.errors import JobFailure
from worker.plan import CompressionPlan, CompressionResult

PACK_QUANTIZED = "pack-quantized"
DENSE = "dense"
# pack-quantized packs integers of 1..8 bits into int32 (compressed-tensors 0.20 packs densely,
# so 3-bit values straddle int32 words); wider integers have no packed format.
PACKABLE_BITS = range(1, 9)

# How a mixed-precision checkpoint loads (run as is by the export check, printed in the model card, with
# `path` its folder). transformers' CompressedTensorsConfig(dequantize=True) decompresses every dense
# Linear with one config group's scheme (transformers 5.25: get_dense_scheme), so a checkpoint with
# several fails to load that way; here each group's own compressor and scheme dequantize its Linears.
MIXED_LOAD_RECIPE = '''\
from pathlib import Path
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained(path)
quantization = QuantizationConfig.model_validate(config.quantization_config)
del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
state = {}
for file in sorted(Path(path).glob("*.safetensors")):
    with safe_open(str(file), "pt") as f:
        state.update({key: f.get_tensor(key) for key in f.keys()})
for scheme in quantization.config_groups.values():  # each group names its Linears
    compressor = BaseCompressor.get_value_from_registry(scheme.format or quantization.format)
    for module in scheme.targets:
        parts = {part: state.pop(f"{module}.{part}") for part in
                 ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape") if f"{module}.{part}" in state}
        state[f"{module}.weight"] = compressor.decompress(parts, scheme)["weight"].to(model.dtype)
loaded = model.load_state_dict(state, strict=False)
tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
if loaded.unexpected_keys or set(loaded.missing_keys) - tied:
    raise ValueError(f"checkpoint does not fit the model: {loaded}")
model.eval()
'''


class ExportError(JobFailure):
    """The artifact could not be written or does not reproduce the compressed model (fails the job)."""


@dataclass(frozen=True)
class StoredScheme:
    """One compressed-tensors config group: a weight grid and the Linears stored on it."""

    bits: int
    group_size: int | None  # None = one group per output row (compressed-tensors "channel")
    symmetric: bool
    act_order: bool
    modules: tuple[str, ...]  # full dotted names, in the run's order


@dataclass(frozen=True)
class CheckpointInfo:
    format: str  # "pack-quantized" or "dense"
    bits: int | None  # bits, group_size, symmetric: the one scheme's; None when dense or mixed
    group_size: int | None  # None = one group per output row (compressed-tensors "channel")
    symmetric: bool | None
    quantized_modules: int
    schemes: tuple[StoredScheme, ...] = ()  # more than one: mixed precision

    @property
    def mixed(self) -> bool:
        return len(self.schemes) > 1


def save_checkpoint(model: nn.Module, tokenizer, result: CompressionResult, plan: CompressionPlan,
                    out_dir: Path) -> CheckpointInfo:
    """Write config, weights and tokenizer into out_dir. The model must hold plain Linears (adapters
    unwrapped); for quantized jobs it is left in compressed-tensors' compressed form."""
    if plan.quant is None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return dense_info()

    quantized = _quantized_modules(result)
    schemes = stored_schemes(result, plan)
    _check_grids(quantized, plan)
    config = _quantization_config(model, quantized, schemes)

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, config, show_progress=False)
    _set_grids(model, quantized)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=PACK_QUANTIZED)
    compressor.compress_model(model)
    _check_packed_codes(model, quantized, plan)
    model.save_pretrained(out_dir, safe_serialization=True)
    compressor.update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    return quantized_info(schemes)


def dense_info() -> CheckpointInfo:
    return CheckpointInfo(format=DENSE, bits=None, group_size=None, symmetric=None, quantized_modules=0)


def quantized_info(schemes: list[StoredScheme]) -> CheckpointInfo:
    one = schemes[0] if len(schemes) == 1 else None
    return CheckpointInfo(format=PACK_QUANTIZED, bits=one and one.bits, group_size=one and one.group_size,
                          symmetric=one and one.symmetric, quantized_modules=sum(len(s.modules) for s in schemes),
                          schemes=tuple(schemes))


def stored_schemes(result: CompressionResult, plan: CompressionPlan) -> list[StoredScheme]:
    """The plan's quantizers as config groups: the modules sharing (bits, group size, symmetry, order),
    in the order of their first module. Refuses bit widths pack-quantized cannot hold."""
    for spec in (plan.quant, *plan.module_quant.values()):
        if spec.bits not in PACKABLE_BITS:
            raise ExportError(f"{spec.bits}-bit weights cannot be exported: compressed-tensors' pack-quantized "
                              f"format holds 1..8-bit integers")
    grouped: dict[tuple, list[str]] = {}
    for name in result.modules:
        spec = plan.quant_for(name)
        key = (spec.bits, None if spec.group_size == -1 else spec.group_size, spec.symmetric, spec.act_order)
        grouped.setdefault(key, []).append(name)
    return [StoredScheme(*key, modules=tuple(names)) for key, names in grouped.items()]


def _quantized_modules(result: CompressionResult) -> dict[str, QuantizedWeight]:
    missing = [name for name, report in result.modules.items() if report.quantized is None]
    if missing:
        raise ExportError(f"the plan quantizes, but {len(missing)} module(s) have no codes (first: {missing[0]})")
    return {name: report.quantized for name, report in result.modules.items()}


def _check_grids(quantized: dict[str, QuantizedWeight], plan: CompressionPlan) -> None:
    """Every module on its quantizer's grid: same bits, same group size, and symmetric zero points at
    the midpoint (compressed-tensors stores no zero point for symmetric grids)."""
    for name, q in quantized.items():
        spec = plan.quant_for(name)
        d_in = q.codes.shape[1]
        expected_group = d_in if spec.group_size == -1 else spec.group_size
        if q.bits != spec.bits or q.group_size != expected_group:
            raise ExportError(f"{name}: codes are {q.bits}-bit in groups of {q.group_size}, the plan says "
                              f"{spec.bits}-bit in groups of {expected_group}")
        midpoint = 2 ** (spec.bits - 1)
        if spec.symmetric and not bool((q.zeros == midpoint).all()):
            raise ExportError(f"{name}: symmetric grid with zero points other than {midpoint}")


def _quantization_config(model: nn.Module, quantized, schemes: list[StoredScheme]):
    """One config group per scheme. A single scheme targets every Linear ("Linear"), as before mixed
    precision; several name their modules exactly (compressed-tensors and vLLM match full names)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for number, scheme in enumerate(schemes):
        weights = QuantizationArgs(
            num_bits=scheme.bits,
            type="int",
            symmetric=scheme.symmetric,
            strategy="channel" if scheme.group_size is None else "group",
            group_size=scheme.group_size,
            # GPTQ's act_order here uses static groups (codes stay in column order, no g_idx), which
            # compressed-tensors calls "weight" ordering: informational for engines, same layout.
            actorder="weight" if scheme.act_order else None,
        )
        targets = ["Linear"] if len(schemes) == 1 else list(scheme.modules)
        groups[f"group_{number}"] = QuantizationScheme(targets=targets, weights=weights)
    # Every Linear Squeeze did not quantize (lm_head, ...) stays in full precision.
    ignore = sorted(name for name, module in model.named_modules()
                    if isinstance(module, nn.Linear) and name not in quantized)
    return QuantizationConfig(config_groups=groups, ignore=ignore, format=PACK_QUANTIZED)


def _set_grids(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Our scales and signed zero points into compressed-tensors' parameters, and as the weight it
    re-derives codes from: the grid values (codes - zeros) * scales in fp32. In fp32 those products
    are exact for bf16/fp16 scales (<= 8-bit integer times <= 11-bit mantissa), whereas the model's
    half-precision weight is that product rounded, which can round an 8-bit code to its neighbour."""
    from compressed_tensors.offload import update_offload_parameter

    for name, q in quantized.items():
        module = model.get_submodule(name)
        grid = dequantize(q.codes, q.scales, q.zeros, q.group_size)  # (d_out, d_in) fp32
        if not torch.equal(grid.to(module.weight.dtype), module.weight.detach()):
            raise ExportError(f"{name}: the model's weight is not the dequantized value of the reported codes")
        module.weight = nn.Parameter(grid, requires_grad=False)
        offset = 2 ** (q.bits - 1)
        scales = q.scales.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)  # (d_out, n_groups)
        update_offload_parameter(module, "weight_scale", scales)
        zero_points = (q.zeros.to(torch.int16) - offset).to(module.weight_zero_point.dtype)  # signed
        update_offload_parameter(module, "weight_zero_point", zero_points.reshape(module.weight_zero_point.shape))


def _check_packed_codes(model: nn.Module, quantized: dict[str, QuantizedWeight], plan: CompressionPlan) -> None:
    """The integers compressed-tensors packed are exactly our codes (and zero points), shifted."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for name, q in quantized.items():
        module_scheme = model.get_submodule(name).quantization_scheme.weights
        if (module_scheme.num_bits, module_scheme.symmetric) != (q.bits, plan.quant_for(name).symmetric):
            raise ExportError(f"{name}: compressed-tensors gave it the scheme {module_scheme.num_bits}-bit "
                              f"symmetric={module_scheme.symmetric}, its codes are {q.bits}-bit")
        module = model.get_submodule(name)
        offset = 2 ** (q.bits - 1)
        packed = unpack_from_int32(module.weight_packed.detach().cpu(), q.bits, q.codes.shape)  # (d_out, d_in) int8
        ours = q.codes.cpu().to(torch.int16) - offset
        _require_equal(name, "codes", packed.to(torch.int16), ours)
        if not plan.quant_for(name).symmetric:
            zero_points = unpack_from_int32(module.weight_zero_point.detach().cpu(), q.bits, q.zeros.shape,
                                            packed_dim=0)
            _require_equal(name, "zero points", zero_points.to(torch.int16), q.zeros.cpu().to(torch.int16) - offset)


def _require_equal(name: str, what: str, packed: Tensor, ours: Tensor) -> None:
    if packed.shape != ours.shape:
        raise ExportError(f"{name}: packed {what} have shape {tuple(packed.shape)}, ours {tuple(ours.shape)}")
    differ = int((packed != ours).sum())
    if differ:
        raise ExportError(f"{name}: compressed-tensors packed {differ} of {ours.numel()} {what} differently "
                          f"from the service's (max difference {int((packed - ours).abs().max())})")
