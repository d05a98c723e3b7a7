"""Reload an exported folder cold, as its model card says (transformers, + PEFT when it has an
adapter), and compare logits.

Tolerance, fp32 (the pipeline's dtype): atol = rtol = 1e-4 on every logit. The reloaded weights
are bit-identical to the in-memory ones (the checkpoint writer checks every packed code, and the
adapter file holds the very fp16 values CompensatedLinear computes with, or codes that the card's
recipe turns back into them), so what is left is the order of floating-point operations (PEFT's
lora_B(lora_A(x)) * 1.0 against Squeeze's x A^T B^T): measured exactly 0 on the tiny test models
(|logit| <= ~0.7) for RTN/GPTQ 2-8 bits, 2:4 sparsity and mixed-rank EoRA. 1e-4 leaves room for
other kernels while staying far below what one wrong scale in one group of one layer does to the
logits (the tests corrupt one and check that verification fails).
Half precision: the weights and the fp16 adapter values match bit for bit too, but PEFT may run the
low-rank path in the model dtype where CompensatedLinear runs it in fp32 and rounds once; measured
0 on the tiny model with a mixed-rank EoRA adapter in bf16 and fp16 (2 ulps in bf16 when adapters
were stored in fp32). Default there: atol = rtol = 4 * eps of the dtype.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch
from torch import Tensor, nn

from worker.export.adapter import ADAPTER_DIR, CONFIG_NAME, DEQUANTIZE_RECIPE, QUANTIZED_NAME, WEIGHTS_NAME
from worker.export.checkpoint import MIXED_LOAD_RECIPE, ExportError
from worker.stream import CheckpointReader, StreamedLayers

FP32_TOLERANCE = 1e-4
HALF_PRECISION_ULPS = 4


@dataclass(frozen=True)
class VerifyInfo:
    windows: int
    max_abs_diff: float
    max_abs_logit: float  # of the reference, for scale
    atol: float
    rtol: float
    adapter: bool
    seconds: float


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for logits of this dtype; see the module docstring."""
    if dtype == torch.float32 or dtype == torch.float64:
        return FP32_TOLERANCE, FP32_TOLERANCE
    tolerance = HALF_PRECISION_ULPS * torch.finfo(dtype).eps
    return tolerance, tolerance


@torch.no_grad()
def reference_logits(model: nn.Module, windows: Tensor, batch_size: int = 4) -> Tensor:
    """Logits (num_windows, seq_len, vocab) of the in-memory compressed-and-compensated model, on CPU.

    Call before export_model: exporting consumes the model.
    """
    model.eval()
    return torch.cat([model(input_ids=batch).logits.cpu() for batch in windows.split(batch_size)])


@torch.no_grad()
def verify_export(out_dir: Path, reference_logits: Tensor, windows: Tensor, atol: float | None = None,
                  rtol: float | None = None, batch_size: int = 4) -> VerifyInfo:
    """Load out_dir into a fresh model (+ its PEFT adapter) and require its logits on `windows`
    (num_windows, seq_len) to match reference_logits: |new - ref| <= atol + rtol * |ref| everywhere.

    Raises ExportError with the numbers on a mismatch.
    """
    start = perf_counter()
    default_atol, default_rtol = default_tolerance(reference_logits.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    model = load_export(Path(out_dir))
    has_adapter = (Path(out_dir) / ADAPTER_DIR).is_dir()
    logits = torch.cat([model(input_ids=batch).logits.cpu() for batch in windows.split(batch_size)])
    max_abs_diff = _compare(logits, reference_logits, atol, rtol)
    return VerifyInfo(windows=windows.shape[0], max_abs_diff=max_abs_diff,
                      max_abs_logit=float(reference_logits.float().abs().max()), atol=atol, rtol=rtol,
                      adapter=has_adapter, seconds=perf_counter() - start)


@torch.no_grad()
def verify_export_streamed(out_dir: Path, reference_logits: Tensor, windows: Tensor, scratch: Path,
                           device: torch.device, atol: float | None = None, rtol: float | None = None,
                           batch_size: int = 4) -> VerifyInfo:
    """verify_export without holding the reloaded model whole (streamed jobs): the export's layers are
    read one at a time (worker.stream.StreamedLayers over its files), each quantized Linear dequantized
    by the same compressed-tensors call transformers makes when it loads with
    CompressedTensorsConfig(dequantize=True), and the adapter's fp16 factors (after the card's recipe
    when stored quantized) added as CompensatedLinear adds them (what PEFT computes at scaling 1, which
    the adapter config is checked to give every module). scratch: a folder for the recipe's output."""
    start = perf_counter()
    default_atol, default_rtol = default_tolerance(reference_logits.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    source = _ExportLayers(Path(out_dir), scratch, reference_logits.dtype)
    from worker.evaluate import iter_logits

    logits = torch.cat([out.to(reference_logits.dtype).cpu()
                        for _, out in iter_logits(source, windows, device, batch_size)])
    max_abs_diff = _compare(logits, reference_logits, atol, rtol)
    return VerifyInfo(windows=windows.shape[0], max_abs_diff=max_abs_diff,
                      max_abs_logit=float(reference_logits.float().abs().max()), atol=atol, rtol=rtol,
                      adapter=source.adapter is not None, seconds=perf_counter() - start)


def _compare(logits: Tensor, reference_logits: Tensor, atol: float, rtol: float) -> float:
    """max |logits - reference|; raises ExportError with the numbers when over atol + rtol * |reference|."""
    if logits.shape != reference_logits.shape:
        raise ExportError(f"reloaded model gives logits of shape {tuple(logits.shape)}, the in-memory model "
                          f"{tuple(reference_logits.shape)}")
    reference = reference_logits.float()
    diff = (logits.float() - reference).abs()
    max_abs_diff = float(diff.max())
    excess = diff - (atol + rtol * reference.abs())
    if bool((excess > 0).any()) or not torch.isfinite(logits).all():
        window, position, token = torch.unravel_index(torch.argmax(excess), excess.shape)
        raise ExportError(
            f"the exported artifact does not reproduce the compressed model: max |logit difference| "
            f"{max_abs_diff:.3g} (worst at window {int(window)}, position {int(position)}, token {int(token)}: "
            f"{float(logits[window, position, token]):.6g} vs {float(reference[window, position, token]):.6g}); "
            f"allowed {atol:g} + {rtol:g} * |reference|"
        )
    return max_abs_diff


class _ExportReader(CheckpointReader):
    """An export's tensors, each quantized Linear's weight dequantized as transformers does on load."""

    PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

    def __init__(self, folder: Path, quantization_config: dict | None):
        super().__init__(folder)
        self.config = None
        if quantization_config is not None:
            from compressed_tensors.quantization import QuantizationConfig

            self.config = QuantizationConfig.model_validate(quantization_config)
            groups = list(self.config.config_groups.values())
            # One group targets every Linear ("Linear"); several name their Linears (MIXED_LOAD_RECIPE).
            self.schemes = {} if len(groups) == 1 else {module: group for group in groups for module in group.targets}
            self.single = groups[0] if len(groups) == 1 else None

    def __contains__(self, key: str) -> bool:
        return super().__contains__(key) or self._packed(key)

    def _packed(self, key: str) -> bool:
        return self.config is not None and key.endswith(".weight") and super().__contains__(f"{key}_packed")

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        if not self._packed(key):
            return super().get(key, dtype)
        from compressed_tensors.compressors import BaseCompressor

        module = key.removesuffix(".weight")
        scheme = self.single or self.schemes[module]
        compressor = BaseCompressor.get_value_from_registry(scheme.format or self.config.format)
        state = {name: super(_ExportReader, self).get(f"{module}.{name}") for name in self.PACKED
                 if super(_ExportReader, self).__contains__(f"{module}.{name}")}
        weight = compressor.decompress(state, scheme)["weight"]
        return weight if dtype is None else weight.to(dtype)


class _ExportLayers(StreamedLayers):
    """An exported folder as a layer source, with its adapter (if any) attached to each layer."""

    def __init__(self, out_dir: Path, scratch: Path, dtype: torch.dtype):
        config = json.loads((out_dir / "config.json").read_text())
        reader = _ExportReader(out_dir, config.get("quantization_config"))
        super().__init__(out_dir, scratch / "layers", dtype, reader=reader)
        self.adapter = None
        adapter_dir = out_dir / ADAPTER_DIR
        if adapter_dir.is_dir():
            if (adapter_dir / QUANTIZED_NAME).is_file():
                adapter_dir = Path(shutil.copytree(adapter_dir, scratch / ADAPTER_DIR))
                exec(compile(DEQUANTIZE_RECIPE, "model card recipe", "exec"), {"folder": str(adapter_dir)})  # noqa: S102
            from safetensors import safe_open

            self.adapter = safe_open(str(adapter_dir / WEIGHTS_NAME), framework="pt")
            self.adapter_config = json.loads((adapter_dir / CONFIG_NAME).read_text())

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        with super().layer(index) as layer:
            if self.adapter is not None:
                prefix = f"{self.arch.layers}.{index}"
                for relative in self.arch.linear_names:
                    self._attach(layer, prefix, relative)
            yield layer

    def _attach(self, layer: nn.Module, prefix: str, relative: str) -> None:
        from worker.compression.adapters import LowRankAdapter
        from worker.export.adapter import peft_key
        from worker.linear_compress import attach_compensation

        name = f"{prefix}.{relative}"
        key_a, key_b = f"{peft_key(name, 'A')}.weight", f"{peft_key(name, 'B')}.weight"
        if key_a not in self.adapter.keys():
            return
        lora_a, lora_b = self.adapter.get_tensor(key_a), self.adapter.get_tensor(key_b)
        config = self.adapter_config
        rank = config.get("rank_pattern", {}).get(name, config["r"])
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        if rank != lora_a.shape[0] or alpha != rank:
            raise ExportError(f"{name}: the adapter config gives rank {rank} and alpha {alpha} (scaling "
                              f"{alpha / rank:g}) for factors of rank {lora_a.shape[0]}; Squeeze adapters have "
                              "scaling 1")
        attach_compensation(layer, relative, LowRankAdapter(lora_b, lora_a, None))


def load_export(out_dir: Path) -> nn.Module:
    """The exported model loaded the way its model card tells users to: transformers, with
    CompressedTensorsConfig(dequantize=True) when quantized with one scheme, the card's
    MIXED_LOAD_RECIPE when with several; then PEFT when there is an adapter, after
    the card's dequantize recipe when the adapter is stored quantized (run on a copy, so the artifact
    folder keeps exactly the files its manifest lists). CPU, eval mode."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((out_dir / "config.json").read_text())
    kwargs = {}
    groups = config.get("quantization_config", {}).get("config_groups", {})
    if len(groups) > 1:  # mixed precision
        scope = {"path": str(out_dir)}
        exec(compile(MIXED_LOAD_RECIPE, "model card recipe", "exec"), scope)  # noqa: S102
        model = scope["model"]
    else:
        if groups:
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        with warnings.catch_warnings():
            # transformers warns that the checkpoint's own quantization_config wins; only `dequantize` is
            # taken from ours, which is the point.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(out_dir, **kwargs)
    adapter_dir = out_dir / ADAPTER_DIR
    if adapter_dir.is_dir():
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as scratch:
            if (adapter_dir / QUANTIZED_NAME).is_file():
                adapter_dir = Path(shutil.copytree(adapter_dir, Path(scratch) / ADAPTER_DIR))
                exec(compile(DEQUANTIZE_RECIPE, "model card recipe", "exec"), {"folder": str(adapter_dir)})  # noqa: S102
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.eval()
