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
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch
from torch import Tensor, nn

from worker.export.adapter import ADAPTER_DIR, DEQUANTIZE_RECIPE, QUANTIZED_NAME
from worker.export.checkpoint import ExportError

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
    return VerifyInfo(windows=windows.shape[0], max_abs_diff=max_abs_diff, max_abs_logit=float(reference.abs().max()),
                      atol=atol, rtol=rtol, adapter=has_adapter, seconds=perf_counter() - start)


def load_export(out_dir: Path) -> nn.Module:
    """The exported model loaded the way its model card tells users to: transformers, with
    CompressedTensorsConfig(dequantize=True) when quantized; then PEFT when there is an adapter, after
    the card's dequantize recipe when the adapter is stored quantized (run on a copy, so the artifact
    folder keeps exactly the files its manifest lists). CPU, eval mode."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((out_dir / "config.json").read_text())
    kwargs = {}
    if "quantization_config" in config:
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # transformers warns that the checkpoint's own quantization_config wins; only `dequantize` is taken
        # from ours, which is the point.
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
