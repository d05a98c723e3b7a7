"""The sequential pipeline: the one owner of the decoder-layer loop, which registers the statistics hooks
(worker.grams) and spends a rank budget between its walks (worker.adapter_ranks).

Only one decoder layer sits on the compute device at a time; the activations between layers (one
tensor (batch, seq_len, hidden) per batch of windows, in the model's dtype) live on the device, the
host or the disk, as the run's placement says (worker.activations).

How a decoder layer is called directly: the inputs of every layer are recorded from the base
model's own forward (each layer temporarily replaced by an identity recorder), so a layer later
runs as `layer(hidden_states, **recorded_kwargs)` with exactly what the model would pass it:
position_embeddings (cos, sin), attention_mask (None, a 4-D mask, or per layer type for sliding
window families), position_ids, cache=None. Nothing family-specific is re-implemented here.

Pass structure of compress_model:
- no compensation or a fixed rank: one walk. Per layer: a forward with Gram hooks (the original
  layer), compress every Linear, attach its adapter (fixed rank), a forward of the compressed and
  compensated layer to make the next layer's inputs.
- a global rank budget: allocating ranks needs every module's projected singular values first, so
  walk 1 compresses (as above, without adapters) and keeps each module's residual dW on CPU in the
  model dtype (one extra copy of the decoder Linear weights in host memory) and its singular values;
  ranks are allocated; walk 2 re-captures the inputs and, per layer, recomputes the Grams with inputs
  from the compressed *and compensated* previous layers and attaches EoRA with the allocated rank (no
  re-compression). Walk 2 costs one more Gram forward, one more propagation forward and one more
  decomposition per Linear; on_layer is called twice per layer (stage "compress", then "compensate").
In both, a layer's Grams come from one forward of its original weights (llm-compressor's
"sequential" pipeline): o_proj and down_proj see their inputs from the uncompressed q/k/v and
gate/up of the same layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from time import perf_counter

import torch
from torch import Tensor, nn

from worker.activations import (
    CPU,
    HOST,
    Activations,
    LayerInputs,
    Placement,
    capture_layer_inputs,
    closed_on_error,
    forward_layer,
)
from worker.adapter_ranks import allocate_budget, rank_notes
from worker.compression.ranks import rank_cap
from worker.grams import Grams, gram_hooks
from worker.linear_compress import (
    adapter_size,
    attach_compensation,
    compensation_eigenspace,
    compensation_factors,
    compensation_spectrum,
    compress_jointly,
    compress_weight,
    objective_norm,
    relative_output_error,
)
from worker.plan import CompressionPlan, CompressionResult, LayerReport, ModuleReport
from worker.resume import LayerCheckpoints, ResumePoint, module_tensors, report_record, restore_module
from worker.stream import ModelLayers, StreamedLayers

LayerSource = ModelLayers | StreamedLayers


def layer_source(model: nn.Module | LayerSource) -> LayerSource:
    """A model loaded whole as a layer source; a source as it is (worker.stream)."""
    return model if isinstance(model, (ModelLayers, StreamedLayers)) else ModelLayers(model)


def capture_inputs(source: LayerSource, windows: Tensor, batch_size: int, placement: Placement = HOST,
                   device: torch.device = CPU) -> LayerInputs:
    """capture_layer_inputs with the embeddings and final norm materialised meanwhile."""
    source.model.eval()
    with source.parts("embed_tokens", "final_norm"):
        return capture_layer_inputs(source.model, source.arch, windows, batch_size, placement, device)


def walk_layers(model: nn.Module | LayerSource, windows: Tensor, device: torch.device,
                batch_size: int = 8, placement: Placement = HOST) -> Activations:
    """The last decoder layer's outputs per batch (where placement keeps them; the caller closes them),
    one layer on the device at a time."""
    source = layer_source(model)
    inputs = capture_inputs(source, windows, batch_size, placement, device)
    with closed_on_error(inputs.hidden):
        for index in range(len(source)):
            with source.layer(index) as layer, _on_device(layer, device):
                forward_layer(layer, inputs, index, device, keep_outputs=True)
    return inputs.hidden


def compress_model(
    model: nn.Module | LayerSource,
    windows: Tensor,
    plan: CompressionPlan,
    device: torch.device,
    on_layer: Callable[[LayerReport], None] | None = None,
    batch_size: int = 8,
    on_module: Callable[[], None] | None = None,
    checkpoints: LayerCheckpoints | None = None,
    resume: ResumePoint | None = None,
    activations: Placement = HOST,
) -> CompressionResult:
    """Compress (and compensate) every decoder Linear in place, layer by layer; see the module doc.

    model: a model loaded whole, or a layer source (worker.stream.StreamedLayers: each finished layer
    goes to its store, and the result's QuantizedWeight tensors are left on the meta device).

    windows: (num_windows, seq_len) token ids. on_layer (after each layer) and on_module (after each
    Linear) may raise to cancel; the exception propagates and the model is left partly compressed.
    checkpoints: each finished layer is committed there (worker.resume); resume: a committed state of
    an earlier attempt of the same run, whose finished layers are restored instead of recomputed.
    activations: where the activations between layers live (worker.activations).
    """
    run = _Run(model, windows, plan, device, on_layer, batch_size)
    run.on_module, run.checkpoints, run.placement = on_module, checkpoints, activations
    return run.execute(resume)


class _Run:
    """State of one compress_model call."""

    def __init__(self, model, windows, plan, device, on_layer, batch_size):
        self.source = layer_source(model)
        self.model = self.source.model
        self.arch = self.source.arch
        self.layers = self.source.layers
        self.windows = windows
        self.plan = plan
        self.device = device
        self.on_layer = on_layer
        self.batch_size = batch_size
        self.result = CompressionResult(modules={})
        self.steps = len(self.layers) * (2 if plan.uses_budget else 1)
        self.step = 0
        self.residuals: dict[str, Tensor] = {}  # budget plans: W - Wc on CPU until walk 2
        self.spectra: dict[str, Tensor] = {}  # budget plans: projected singular values, CPU
        self.objective_norms: dict[str, float] = {}  # budget plans: objective_norm(W) per module
        self.capped: dict[str, int] = {}  # fixed rank at/above the dense-delta crossover: name -> cap
        self.short: dict[str, int] = {}  # fewer real directions than the rank asked: name -> true rank
        self.ranks: dict[str, int] | None = None  # budget plans: the allocation, once made
        self.records: dict[str, dict] = {}  # report_record of every finished module, by full name
        self.on_module: Callable[[], None] | None = None
        self.checkpoints: LayerCheckpoints | None = None
        self.placement = HOST

    @torch.no_grad()
    def execute(self, resume: ResumePoint | None = None) -> CompressionResult:
        self.model.eval()
        walk, done, hidden = ("compress", 0, None) if resume is None else self._restore(resume)
        if walk == "compress":
            self._walk("compress", self._compress_layer, done, hidden)
            done, hidden = 0, None
        if self.plan.uses_budget:
            if self.ranks is None:
                self.ranks = self._allocate_ranks()
            ranks = self.ranks
            self._walk("compensate", lambda index, layer, grams: self._compensate_layer(index, layer, grams, ranks),
                       done, hidden)
        if self.plan.compensates:
            self.result.notes += rank_notes(self.plan, self.result, self.capped, self.short)
        return self.result

    def _walk(self, stage: str, process: Callable[[int, nn.Module, dict], list[ModuleReport]], first: int = 0,
              hidden: Iterable[Tensor] | None = None) -> None:
        """Layers first.. of one walk; hidden: the inputs of layer `first` (restored from a checkpoint)."""
        if first >= len(self.layers):
            return
        start = perf_counter()
        inputs = capture_inputs(self.source, self.windows, self.batch_size, self.placement, self.device)
        with inputs.hidden:
            if hidden is not None:
                inputs.hidden.overwrite(hidden)
            self.result.calibration_seconds += perf_counter() - start
            self._walk_from(stage, process, first, inputs)

    def _walk_from(self, stage: str, process: Callable[[int, nn.Module, dict], list[ModuleReport]], first: int,
                   inputs: LayerInputs) -> None:
        """Layers first.. of one walk, from their inputs."""
        for index in range(first, len(self.layers)):
            with self.source.layer(index) as layer:
                self._reload_stored(index)
                layer_start = perf_counter()
                self._timed("transfer_seconds", layer.to, self.device)
                try:
                    grams = self._grams(layer, inputs, index) if self.plan.compresses else {}
                    reports = process(index, layer, grams)
                    del grams
                    self._timed("propagation_seconds", forward_layer, layer, inputs, index, self.device, True)
                finally:
                    self._timed("transfer_seconds", layer.to, "cpu")
                self._park_quantized_weights(layer, index)
                self.step += 1
                tensors = self._finish_layer(layer, index)
            if self.checkpoints is not None:
                last = index == len(self.layers) - 1
                self.checkpoints.save(stage, index, tensors, None if last else inputs.hidden, self._bookkeeping())
            del tensors
            if self.on_layer is not None:
                self.on_layer(
                    LayerReport(
                        stage, index, len(self.layers), self.step, self.steps, perf_counter() - layer_start, reports
                    )
                )

    def _grams(self, layer: nn.Module, inputs: LayerInputs, index: int) -> dict[tuple[str, ...], Grams]:
        skip = self.plan.compensation.sink_tokens if self.plan.compensates else 0
        start = perf_counter()
        with gram_hooks(layer, self.arch, skip) as accumulators:
            forward_layer(layer, inputs, index, self.device, keep_outputs=False)
        self.result.calibration_seconds += perf_counter() - start
        grams = {}
        for group, acc in accumulators.items():
            name = f"{self.arch.layers}.{index}.{group[0]}"
            if acc.gram is None or not torch.isfinite(acc.gram).all():
                raise FloatingPointError(f"{name}: non-finite inputs (Gram matrix); an earlier module is broken")
            if skip and acc.body_tokens == 0:
                raise ValueError(f"{name}: sink_tokens={skip} leaves no calibration token for the compensation")
            compensate = acc.body if skip else acc.gram
            space = None
            if self.plan.compensates:
                start = perf_counter()
                space = compensation_eigenspace(compensate, self.plan.compensation, name)
                self.result.compensation_seconds += perf_counter() - start
            grams[group] = Grams(acc.gram, compensate, space)
        return grams

    def _compress_layer(self, index: int, layer: nn.Module, grams: dict) -> list[ModuleReport]:
        plan = self.plan
        reports = []
        for group, group_grams in grams.items():
            gram = group_grams.compress
            for relative in group:
                name = f"{self.arch.layers}.{index}.{relative}"
                linear = layer.get_submodule(relative)
                # A copy: the layer's weight is overwritten with Wc below, and error_after and the
                # budget's objective_norm must still see W.
                original = linear.weight.detach().clone()  # (d_out, d_in)
                refine_errors = []
                if plan.compensates and plan.compensation.refine:  # fixed rank: the job spec's rule
                    rank = min(plan.rank_for(name), rank_cap(*original.shape))
                    compressed, refine_errors = compress_jointly(original, gram, plan.quant_for(name), plan.sparsity,
                                                                 plan.compensation_for(name), rank, name,
                                                                 group_grams.compensate, group_grams.space)
                else:
                    compressed = compress_weight(original, gram, plan.quant_for(name), plan.sparsity, name)
                residual = original.float() - compressed.weight.float()  # (d_out, d_in) fp32
                stats_start = perf_counter()
                report = ModuleReport(
                    name=name,
                    shape=tuple(original.shape),
                    quantized=compressed.quantized,
                    sparsity=None if plan.sparsity is None else plan.sparsity.pattern,
                    zero_fraction=float((compressed.weight == 0).float().mean()),
                    error_before=relative_output_error(residual, original, gram),
                    compress_seconds=compressed.seconds,
                    refine_errors=refine_errors,
                )
                self.result.statistics_seconds += perf_counter() - stats_start
                self.result.compression_seconds += compressed.seconds
                linear.weight.data.copy_(compressed.weight)
                if plan.compensates and plan.compensation.rank is not None:
                    self._compensate(layer, relative, report, residual, original, group_grams, plan.rank_for(name))
                elif plan.uses_budget:
                    start = perf_counter()
                    spec = plan.compensation
                    self.spectra[name] = compensation_spectrum(residual, group_grams.compensate, spec, name,
                                                                group_grams.space).cpu()
                    self.objective_norms[name] = objective_norm(original, group_grams.compensate, spec)
                    self.result.compensation_seconds += perf_counter() - start
                    self.residuals[name] = residual.to(original.dtype).cpu()
                self.result.modules[name] = report
                reports.append(report)
                if self.on_module is not None:
                    self.on_module()
        return reports

    def _compensate_layer(self, index: int, layer: nn.Module, grams: dict, ranks: dict[str, int]) -> list[ModuleReport]:
        reports = []
        for group, group_grams in grams.items():
            gram = group_grams.compress
            for relative in group:
                name = f"{self.arch.layers}.{index}.{relative}"
                report = self.result.modules[name]
                residual = self.residuals.pop(name).to(self.device).float()  # (d_out, d_in)
                compressed = layer.get_submodule(relative).weight.detach()
                original = compressed.float() + residual
                # Before/after on the same (walk 2) Gram, so the two errors compare.
                start = perf_counter()
                report.error_before = relative_output_error(residual, original, gram)
                self.result.statistics_seconds += perf_counter() - start
                self._compensate(layer, relative, report, residual, original, group_grams, ranks[name])
                reports.append(report)
                if self.on_module is not None:
                    self.on_module()
        return reports

    def _compensate(self, layer, relative, report, residual, original, grams: Grams, rank: int) -> None:
        spec = self.plan.compensation_for(report.name)
        if rank > rank_cap(*report.shape):
            rank = self.capped[report.name] = rank_cap(*report.shape)
        report.error_after = report.error_before
        if rank == 0:
            return
        start = perf_counter()
        adapter = compensation_factors(residual, grams.compensate, spec, rank, report.name, grams.space)
        if adapter.rank < rank:
            self.short[report.name] = adapter.rank
        if adapter.rank == 0:
            return
        attach_compensation(layer, relative, adapter)
        report.compensate_seconds = perf_counter() - start
        self.result.compensation_seconds += report.compensate_seconds
        start = perf_counter()
        report.error_after = relative_output_error(residual - adapter.delta(), original, grams.compress)
        self.result.statistics_seconds += perf_counter() - start
        report.rank = adapter.rank
        report.adapter_params, report.adapter_bytes = adapter_size(*report.shape, report.rank, spec)
        report.adapter_bits = spec.adapter_bits

    def _allocate_ranks(self) -> dict[str, int]:
        start = perf_counter()
        shapes = {name: m.shape for name, m in self.result.modules.items()}
        ranks, self.result.budget_params, notes = allocate_budget(self.plan.compensation, self.spectra,
                                                                  self.objective_norms, shapes)
        self.result.notes += notes
        self.spectra.clear()
        self.objective_norms.clear()
        self.result.compensation_seconds += perf_counter() - start
        return ranks

    def _park_quantized_weights(self, layer: nn.Module, index: int) -> None:
        """Keep this layer's codes/scales/zeros on CPU, and point each QuantizedWeight.weight at the
        (CPU) model weight instead of holding a second copy."""
        prefix = f"{self.arch.layers}.{index}."
        for name, report in self.result.modules.items():
            quantized = report.quantized
            if quantized is not None and name.startswith(prefix):
                module = layer.get_submodule(name[len(prefix) :])
                quantized.weight = getattr(module, "base", module).weight.detach()
                quantized.codes = quantized.codes.cpu()
                quantized.scales = quantized.scales.cpu()
                quantized.zeros = quantized.zeros.cpu()

    def _finish_layer(self, layer: nn.Module, index: int) -> dict[str, Tensor]:
        """Record the finished layer's modules and hand it to the source; its checkpoint tensors. A streamed
        run then keeps none of the layer's tensors in memory: its codes are left on the meta device and
        its residuals (budget plans) are read back from the store in walk 2."""
        tensors = self._layer_tensors(layer, index) if self.source.streamed or self.checkpoints is not None else {}
        records = {}
        for relative, name in self._layer_modules(index):
            records[relative] = self.records[name] = report_record(self.result.modules[name],
                                                                   layer.get_submodule(relative))
        self.source.finish(index, layer, tensors, records)
        if self.source.streamed:
            for _, name in self._layer_modules(index):
                _forget_tensors(self.result.modules[name].quantized)
                self.residuals.pop(name, None)
        return tensors

    def _reload_stored(self, index: int) -> None:
        """A streamed run's second walk: the layer's codes and walk-1 residuals back from the store."""
        stored = self.source.stored_tensors(index)
        for relative, name in self._layer_modules(index) if stored else ():
            quantized = self.result.modules[name].quantized
            if quantized is not None:
                quantized.codes, quantized.scales, quantized.zeros = (
                    stored[f"{relative}.{part}"] for part in ("codes", "scales", "zeros"))
            if f"{relative}.residual" in stored:
                self.residuals[name] = stored[f"{relative}.residual"]

    def _layer_modules(self, index: int) -> list[tuple[str, str]]:
        """(relative, full name) of the layer's compressed Linears."""
        prefix = f"{self.arch.layers}.{index}."
        return [(name[len(prefix):], name) for name in self.result.modules if name.startswith(prefix)]

    def _layer_tensors(self, layer: nn.Module, index: int) -> dict[str, Tensor]:
        """What a checkpoint keeps of a finished layer: its modules' tensors, and a budget plan's walk-1
        residuals and spectra."""
        tensors = {}
        for relative, name in self._layer_modules(index):
            tensors |= module_tensors(relative, layer.get_submodule(relative), self.result.modules[name])
            if name in self.residuals:
                tensors[f"{relative}.residual"] = self.residuals[name]
            if name in self.spectra:
                tensors[f"{relative}.spectrum"] = self.spectra[name]
        return tensors

    def _bookkeeping(self) -> dict:
        """Everything but tensors that the rest of the run reads: reports, counters, notes, ranks."""
        result = self.result
        modules = {name: self.records[name] for name in result.modules}
        seconds = {k: getattr(result, k) for k in ("calibration_seconds", "compression_seconds",
                                                   "compensation_seconds", "statistics_seconds",
                                                   "propagation_seconds", "transfer_seconds")}
        return {"modules": modules, "seconds": seconds, "budget_params": result.budget_params,
                "notes": list(result.notes), "step": self.step, "capped": self.capped, "short": self.short,
                "objective_norms": self.objective_norms, "ranks": self.ranks}

    def _restore(self, resume: ResumePoint) -> tuple[str, int, Iterable[Tensor] | None]:
        """Put an earlier attempt's finished layers back; (walk, first layer to compute, its inputs)."""
        run = resume.run
        for name, seconds in run["seconds"].items():
            setattr(self.result, name, seconds)
        self.result.budget_params = run["budget_params"]
        self.result.notes = list(run["notes"])
        self.step, self.capped, self.short = run["step"], dict(run["capped"]), dict(run["short"])
        self.objective_norms, self.ranks = dict(run["objective_norms"]), run["ranks"]
        records = run["modules"]
        self.records = dict(records)
        for index in sorted(resume.layers):
            tensors = resume.layer_tensors(index)
            prefix = f"{self.arch.layers}.{index}."
            with self.source.layer(index) as layer:
                for name in [n for n in records if n.startswith(prefix)]:  # in the order the run made them
                    relative = name[len(prefix):]
                    self.result.modules[name] = restore_module(layer, relative, relative, tensors, records[name])
                    if f"{relative}.residual" in tensors:
                        self.residuals[name] = tensors[f"{relative}.residual"]
                    if f"{relative}.spectrum" in tensors and self.ranks is None:  # not yet allocated
                        self.spectra[name] = tensors[f"{relative}.spectrum"]
                if self.source.streamed:
                    self._park_quantized_weights(layer, index)
                    self._finish_layer(layer, index)
        return resume.walk, resume.done, resume.hidden()

    def _timed(self, total: str, fn, *args) -> None:
        start = perf_counter()
        fn(*args)
        setattr(self.result, total, getattr(self.result, total) + perf_counter() - start)


def _forget_tensors(quantized) -> None:
    """A QuantizedWeight's tensors replaced by meta tensors of the same shape and dtype (its layer's store
    holds them)."""
    if quantized is not None:
        for field in ("weight", "codes", "scales", "zeros"):
            setattr(quantized, field, torch.empty_like(getattr(quantized, field), device="meta"))


@contextmanager
def _on_device(module: nn.Module, device: torch.device):
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
