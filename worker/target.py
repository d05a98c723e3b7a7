"""A size target: spend a number of stored bits per weight over the decoder Linears where the calibration
says it matters, and turn the choice into a CompressionPlan with per-module quantizers, adapter ranks and
adapter precisions.

1. Before any work: the budget is floor(bits_per_weight * Linear weights / 8) bytes, counted as the
   export counts them (worker.export.sizes: codes, scales, zero points, weight_shape; adapters as
   stored, or at fp16 for engines that hold them so). The smallest plan the options allow is computed
   from the byte formulas alone (the smallest adapter at its cheapest offered precision where rank 0 is
   not offered); a budget below it fails with that size.
2. Sensitivity (output_sensitivity): the loss increase of an output error dy at Linear m is, to second
   order, 1/2 E[dy^T F_m dy] with F_m = E[g g^T], g = dLoss/dy_m (the Fisher at the module's output; the
   first-order term vanishes in expectation at a trained optimum). Taking F_m isotropic, 1/2 (E||g||^2 /
   d_out) E||dy||^2: the weight of module m is the mean squared loss gradient per output coordinate,
   measured by one backward pass of the first SENSITIVITY_WINDOWS calibration windows through the
   original model, and E||dy||^2 is what worker.candidates measures, tr(dW S dW^T) (over the first
   CURVE_WINDOWS windows). Unlike equal weights, this counts that an error in an early layer's down_proj
   moves the loss more than the same error in a late q_proj (on the tiny test model the weights span three
   decades). A streamed model has no whole-model backward pass: its Linears weigh the same, and the job
   says so (TargetPlan.sensitivity_kind).
3. Error curves: one walk of the first CURVE_WINDOWS calibration windows over the original model's layers,
   one forward per layer for the Grams and the next layer's inputs (inputs from the uncompressed layers
   before: an approximation, the compression run itself is sequential), every option (quantizer, adapter
   rank, adapter precision) of every Linear measured (worker.candidates.measure_options; with the
   quantizers' method replaced by `measure_with`; a quantized adapter's error is that of its stored,
   dequantized form).
4. Allocation (worker.compression.allocate) over units: a Linear, or for vLLM each set it fuses (q/k/v,
   gate/up), whose members must share one quantizer and keep their own ranks (and adapter precisions: an
   engine's adapter is fp16, and vLLM targets offer only that).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from worker.activations import HOST, LayerInputs, Placement
from worker.candidates import Option, measure_options
from worker.compression.allocate import Allocation, Candidate, allocate
from worker.compression.ranks import rank_cap
from worker.compression.specs import QuantSpec
from worker.engines import VLLM_FUSED, VLLM_LORA_RANKS, VLLM_WNA16_BITS
from worker.export.sizes import pack_quantized_bytes
from worker.grams import gram_hooks
from worker.linear_compress import adapter_served_bytes, adapter_size, compensation_eigenspace
from worker.models import decoder_linears
from worker.plan import CompressionPlan
from worker.sequential import LayerSource, capture_inputs, forward_layer, layer_source

# Calibration windows the sensitivity's backward pass reads (the first ones). On SmolLM2-135M, 64 x 512-token
# windows, 16 give every Linear's weight within 6 % (rms of the log ratio; 32 % at most) of all 64's, at a
# quarter of the pass's time (93 vs 307 s at one thread), which was as long as the compression itself.
SENSITIVITY_WINDOWS = 16
# Calibration windows the error curves' Grams read (the first ones). On SmolLM2-135M's first four layers, every
# option's error from 16 windows is within 3.2 % of all 64's (rms of the log ratio; 11.5 % at most, -2.1 % on
# average: a fit is judged on the tokens it was made on), far below the steps between the options, at a quarter
# of the walk's time (7.6 vs 32.5 s at one thread): the walk was a third of the planning.
CURVE_WINDOWS = 16


class TargetError(ValueError):
    """The size target cannot be met or asked for something its engine does not load."""


@dataclass(frozen=True, kw_only=True)
class SizeTarget:
    bits_per_weight: float  # stored bits over the decoder Linears, adapters included
    engine: Literal["vllm", "transformers"]
    bits: tuple[int, ...]  # bit widths offered
    group_sizes: tuple[int, ...]  # group sizes offered where they divide the Linear's width; -1 = per channel
    ranks: tuple[int, ...]  # adapter ranks offered, 0 = none (only with a compensation method)
    adapter_bits: tuple[int | None, ...] = (None,)  # adapter precisions offered, None = fp16 factors
    measure_with: Literal["rtn", "gptq"]  # the quantizer the error curves are measured with
    # Bytes a stored scale is counted at; None: the model's dtype, what the export writes (a job). The
    # benchmarks compute in fp32 and count fp16 scales (bench.sizes.SCALE_BITS), and plan so.
    scale_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.engine == "vllm":
            if set(self.bits) - set(VLLM_WNA16_BITS):
                raise TargetError(f"vLLM loads {VLLM_WNA16_BITS} bit weights, not {sorted(self.bits)}")
            if set(self.ranks) - {0, *VLLM_LORA_RANKS}:
                raise TargetError(f"vLLM takes adapter ranks {VLLM_LORA_RANKS}, not {sorted(self.ranks)}")
            if self.adapter_bits != (None,):
                raise TargetError(f"vLLM loads fp16 adapters, not adapter bits {self.adapter_bits}")
        if not self.adapter_bits:
            raise ValueError("a size target offers at least one adapter precision")


@dataclass(frozen=True)
class TargetPlan:
    plan: CompressionPlan  # the base plan with a quantizer and a rank for every Linear
    budget: int  # bytes
    weights: int  # decoder Linear weights
    allocation: Allocation
    chosen: dict[str, Option]
    sensitivity: dict[str, float]
    sensitivity_kind: Literal["fisher", "uniform"]  # uniform: a streamed model (no whole-model backward pass)
    seconds: dict[str, float]  # wall time of each part: sensitivity, forward (the walk), measurement, allocation

    @property
    def bits_per_weight(self) -> float:
        """What the plan will store, from the byte formulas (the export counts the same from the files)."""
        return 8 * self.allocation.bytes / self.weights


def plan_for_target(model: nn.Module | LayerSource, windows: Tensor, base: CompressionPlan, target: SizeTarget,
                    device: torch.device, batch_size: int = 8, placement: Placement = HOST,
                    curve_windows: int = CURVE_WINDOWS) -> TargetPlan:
    """The plan meeting `target` with the least predicted loss increase; see the module doc.

    base: the job's quantizer (its method, symmetry, damp, order; bits and group size are chosen here),
    sparsity and compensation (method, damp, adapter group size; its rank and adapter precision are
    chosen here, from target.ranks and target.adapter_bits). model: held whole (in eval mode), or a
    streamed layer source, whose Linears all weigh the same (no backward pass through the whole model);
    either is left unchanged. The plan's `quant` is the quantizer most Linears got, module_quant the
    others'; with compensation every Linear's rank is in module_rank, and the adapter precision most
    adapted Linears got is compensation.adapter_bits, module_adapter_bits the others'.
    placement: where the measuring walk keeps the activations between layers (the job's, worker.activations).
    curve_windows: how many of the first windows the error curves' Grams read (a job: CURVE_WINDOWS).
    """
    if base.quant is None or base.module_quant or base.module_rank or base.module_adapter_bits:
        raise ValueError("a size target needs a base plan with one quantizer and no per-module choices")
    served = target.engine == "vllm"
    if served and base.compensates and base.compensation.adapter_bits is not None:
        raise TargetError("vLLM loads fp16 adapters: adapter_bits does not fit engine 'vllm'")
    source = layer_source(model)
    linears = decoder_linears(source.model, source.arch)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    scale_bytes = target.scale_bytes or next(iter(linears.values())).weight.element_size()  # None: the model dtype
    weights = sum(d_out * d_in for d_out, d_in in shapes.values())
    budget = math.floor(target.bits_per_weight * weights / 8)
    units = _units(list(shapes), served)
    smallest = sum(min(sum(_least_bytes(base, target, quant, shapes[name], scale_bytes, served) for name in unit)
                       for quant in _quants(base.quant, target, shapes[unit[0]][1])) for unit in units)
    if smallest > budget:
        raise TargetError(f"target.bits_per_weight {target.bits_per_weight:g} cannot be met: the smallest plan "
                          f"stores {8 * smallest / weights:.4f} bits per weight ({smallest:,} bytes over {weights:,} "
                          "Linear weights)")

    seconds = dict.fromkeys(("sensitivity", "forward", "measurement", "allocation"), 0.0)
    start = time.perf_counter()
    if source.streamed:
        kind, sensitivity = "uniform", dict.fromkeys(linears, 1.0)
    else:
        kind, sensitivity = "fisher", output_sensitivity(source.model, source.arch, windows[:SENSITIVITY_WINDOWS],
                                                           batch_size)
    seconds["sensitivity"] = time.perf_counter() - start
    with torch.no_grad():
        inputs = capture_inputs(source, windows[:curve_windows], batch_size, placement, device)
    with inputs.hidden:
        options = _measure(source, inputs, base, target, device, served, seconds)
    start = time.perf_counter()
    candidates, members = {}, {}
    for unit in units:
        key = unit[0]
        members[key], candidates[key] = _unit_options(unit, options, sensitivity)
    allocation = allocate(candidates, dict.fromkeys(candidates, 1.0), budget)
    seconds["allocation"] = time.perf_counter() - start
    chosen = {}
    for key, index in allocation.choice.items():
        chosen.update(members[key][index])
    quants = {name: replace(option.quant, method=base.quant.method) for name, option in chosen.items()}
    common = Counter(quants.values()).most_common(1)[0][0]  # ties: the first chosen
    plan = replace(base, quant=common, module_quant={name: q for name, q in quants.items() if q != common})
    if base.compensates:
        ranks = {name: option.rank for name, option in chosen.items()}
        precisions = {name: option.adapter_bits for name, option in chosen.items() if option.rank}
        bits = Counter(precisions.values()).most_common(1)[0][0] if precisions else base.compensation.adapter_bits
        compensation = replace(base.compensation, rank=max(1, *ranks.values()), budget_params=None,
                               budget_fraction=None, adapter_bits=bits)
        plan = replace(plan, compensation=compensation, module_rank=ranks,
                       module_adapter_bits={name: b for name, b in precisions.items() if b != bits})
    return TargetPlan(plan=plan, budget=budget, weights=weights, allocation=allocation, chosen=chosen,
                      sensitivity=sensitivity, sensitivity_kind=kind, seconds=seconds)


def output_sensitivity(model: nn.Module, arch, windows: Tensor, batch_size: int) -> dict[str, float]:
    """E||dLoss/dy_m||^2 / d_out per decoder Linear m (see the module doc), over the calibration windows'
    next-token loss summed over tokens; one backward pass per batch. Parameters get no gradients."""
    linears = decoder_linears(model, arch)
    squares = dict.fromkeys(linears, 0.0)
    tokens = 0

    def capture(name: str):
        def add(grad: Tensor) -> None:
            squares[name] += float(grad.double().square().sum())

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            output.register_hook(add)

        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [arch.module(model, "embed_tokens").register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_())]
    handles += [linear.register_forward_hook(capture(name)) for name, linear in linears.items()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                predicted = batch.shape[0] * (batch.shape[1] - 1)  # the loss is their mean
                (model(input_ids=batch, labels=batch).loss * predicted).backward()
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: squares[name] / (tokens * linears[name].out_features) for name in linears}


def _units(names: list[str], fused: bool) -> list[tuple[str, ...]]:
    """Allocation units in the run's order: each Linear, or (vLLM) each set it fuses within a parent."""
    if not fused:
        return [(name,) for name in names]
    units, taken = [], set()
    for name in names:
        if name in taken:
            continue
        parent, _, child = name.rpartition(".")
        fuse = next((f for f in VLLM_FUSED if child in f), (child,))
        unit = tuple(f"{parent}.{member}" for member in fuse if f"{parent}.{member}" in names)
        taken.update(unit)
        units.append(unit)
    return units


def _quants(base: QuantSpec, target: SizeTarget, d_in: int) -> list[QuantSpec]:
    groups = [g for g in target.group_sizes if g == -1 or (0 < g < d_in and d_in % g == 0)]
    return [replace(base, method=target.measure_with, bits=bits, group_size=group)
            for bits in target.bits for group in groups]


def _least_bytes(base: CompressionPlan, target: SizeTarget, quant: QuantSpec, shape: tuple[int, int],
                 scale_bytes: int, served: bool) -> int:
    """The fewest bytes a Linear can take with this quantizer (its smallest adapter, at the offered
    precision that stores it in the fewest bytes, when 0 is not offered)."""
    d_out, d_in = shape
    stored = sum(pack_quantized_bytes(d_out, d_in, quant.bits, quant.group_size, quant.symmetric,
                                      scale_bytes).values())
    if not base.compensates or 0 in target.ranks:
        return stored
    sizes = [adapter_size(d_out, d_in, min(target.ranks), replace(base.compensation, adapter_bits=bits))
             for bits in target.adapter_bits]
    return stored + min(adapter_served_bytes(params) if served else adapter for params, adapter in sizes)


@torch.no_grad()
def _measure(source: LayerSource, inputs: LayerInputs, base: CompressionPlan, target: SizeTarget, device: torch.device,
             served: bool, seconds: dict[str, float]) -> dict[str, list[Option]]:
    """Every option of every decoder Linear, one layer on the device at a time (original weights); adapters
    fitted, as the run fits them, on the Gram without the compensation's sink tokens. Adds the walk's
    time to seconds["forward"] and the options' to seconds["measurement"]."""
    arch, spec = source.arch, base.compensation if base.compensates else None
    options: dict[str, list[Option]] = {}
    for index in range(len(source)):
        with source.layer(index) as layer:
            layer.to(device)
            try:
                skip = 0 if spec is None else spec.sink_tokens
                start = time.perf_counter()
                with gram_hooks(layer, arch, skip) as accumulators:  # one forward: Grams and the next inputs
                    forward_layer(layer, inputs, index, device, keep_outputs=True)
                seconds["forward"] += time.perf_counter() - start
                start = time.perf_counter()
                for group, acc in accumulators.items():
                    first = f"{arch.layers}.{index}.{group[0]}"
                    compensate = acc.body if skip else acc.gram
                    space = None if spec is None else compensation_eigenspace(compensate, spec, first)
                    for relative in group:
                        name = f"{arch.layers}.{index}.{relative}"
                        weight = layer.get_submodule(relative).weight.detach()  # (d_out, d_in)
                        ranks = [r for r in target.ranks if r <= rank_cap(*weight.shape)]
                        options[name] = measure_options(
                            weight, acc.gram, _quants(base.quant, target, weight.shape[1]), base.sparsity, spec,
                            ranks, target.adapter_bits, name, space, served, compensate,
                            target.scale_bytes)
                seconds["measurement"] += time.perf_counter() - start
            finally:
                layer.to("cpu")
    return options


def _unit_options(unit: Sequence[str], options: dict[str, list[Option]],
                  sensitivity: dict[str, float]) -> tuple[list[dict[str, Option]], list[Candidate]]:
    """A unit's choices (one shared quantizer, each member its own rank) and their candidates, with the
    error weighted by sensitivity. Per member and quantizer only the options on its (bytes, error)
    Pareto frontier are combined: the others can never be part of an optimum."""
    choices, candidates = [], []
    quants = list(dict.fromkeys(option.quant for option in options[unit[0]]))
    for quant in quants:
        per_member = [_pareto([o for o in options[name] if o.quant == quant]) for name in unit]
        for combo in itertools.product(*per_member):
            choices.append(dict(zip(unit, combo, strict=True)))
            candidates.append(Candidate(bytes=sum(o.bytes for o in combo),
                                        error=sum(sensitivity[name] * o.error for name, o in zip(unit, combo,
                                                                                                 strict=True))))
    return choices, candidates


def _pareto(options: list[Option]) -> list[Option]:
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.bytes, o.error)):
        if not kept or option.error < kept[-1].error:
            kept.append(option)
    return kept
