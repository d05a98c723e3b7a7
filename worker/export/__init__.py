"""A job's artifact: compressed checkpoint + PEFT adapter + squeeze.json + model card, and its check.

Folder written by export_model:
    config.json, generation_config.json   transformers config (+ quantization_config when quantized)
    model.safetensors (or shards + index)  compressed-tensors pack-quantized, or dense with zeros
    tokenizer.json, tokenizer_config.json, ...
    adapter/adapter_config.json            PEFT LoRA config (only when compensation kept a rank > 0)
    adapter/adapter_model.safetensors      fp16 factors, or when any module's adapter is quantized instead
    adapter/adapter_quantized.safetensors  packed integer codes + fp16 scales, fp16 factors of the modules
                                           kept in fp16 (the card's recipe turns it into adapter_model.safetensors)
    README.md                              model card: loading with transformers, PEFT, vLLM
    squeeze.json                           manifest, written last, with every other file's sha256

export_model consumes the model (adapters unwrapped, Linears replaced by compressed-tensors'
packed form): compute reference logits first (reference_logits), then export, then verify_export.
A streamed run (worker.stream.StreamedLayers) exports the same files one layer at a time
(worker.export.streamed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from worker.export.adapter import AdapterInfo, save_adapter
from worker.export.checkpoint import CheckpointInfo, ExportError, save_checkpoint
from worker.export.manifest import (
    CARD_NAME,
    MANIFEST_NAME,
    build_manifest,
    check_manifest_extra,
    model_card,
    write_manifest,
)
from worker.export.sizes import linear_sizes
from worker.export.streamed import save_checkpoint_streamed
from worker.export.verify import VerifyInfo, reference_logits, verify_export, verify_export_streamed
from worker.linear_compress import unwrap_adapters
from worker.plan import CompressionPlan, CompressionResult
from worker.stream import StreamedLayers

__all__ = ["ExportError", "ExportInfo", "VerifyInfo", "export_model", "reference_logits", "verify_export",
           "verify_export_streamed"]


@dataclass(frozen=True)
class ExportInfo:
    out_dir: Path
    files: list[str]  # relative posix paths, squeeze.json included
    checkpoint: CheckpointInfo
    adapter: AdapterInfo | None
    manifest: dict[str, Any] = field(repr=False)
    sizes: dict[str, Any] = field(default_factory=dict)  # worker.export.sizes.linear_sizes

    @property
    def notes(self) -> list[str]:
        return self.manifest["notes"]


def export_model(model: nn.Module | StreamedLayers, tokenizer, result: CompressionResult, plan: CompressionPlan, out_dir: Path,
                 manifest_extra: dict[str, Any]) -> ExportInfo:
    """Write the artifact of a compress_model run into out_dir (created; must be empty if it exists).

    manifest_extra: "job" (the job spec), "model" ({"id", "revision", "source"}), "calibration"
    (windows shape and hash), "evaluation" (results); merged into squeeze.json as given.
    """
    check_manifest_extra(manifest_extra)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"export folder {out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    if isinstance(model, StreamedLayers):
        adapters: dict = {}
        parts = model.store.folder / "export"
        checkpoint = save_checkpoint_streamed(model, tokenizer, result, plan, out_dir, parts, adapters)
        shutil.rmtree(parts, ignore_errors=True)
        _check_adapters(adapters, result)
    else:
        adapters = unwrap_adapters(model)
        _check_adapters(adapters, result)
        checkpoint = save_checkpoint(model, tokenizer, result, plan, out_dir)
    adapter = save_adapter(adapters, out_dir) if adapters else None
    _check_adapter_bytes(adapter, result)

    manifest = build_manifest(result, plan, checkpoint, adapter, manifest_extra)
    (out_dir / CARD_NAME).write_text(model_card(manifest))
    manifest = write_manifest(manifest, out_dir)
    files = sorted([*manifest["files"], MANIFEST_NAME])
    return ExportInfo(out_dir=out_dir, files=files, checkpoint=checkpoint, adapter=adapter, manifest=manifest,
                      sizes=linear_sizes(out_dir, result, adapter))


def _check_adapters(adapters: dict, result: CompressionResult) -> None:
    """The adapters in the model are exactly the ones the run reported (name and rank)."""
    reported = {name: m.rank for name, m in result.modules.items() if m.rank > 0}
    found = {name: adapter.rank for name, adapter in adapters.items()}
    if found != reported:
        differ = sorted(set(found.items()) ^ set(reported.items()))
        raise ExportError(f"the model's adapters do not match the compression report (first difference: {differ[0]})")


def _check_adapter_bytes(adapter: AdapterInfo | None, result: CompressionResult) -> None:
    """The size the run accounted (rank budgets and size targets spend it, benchmarks report it) is what the
    file holds, module by module (each at its own precision)."""
    stored = {} if adapter is None else adapter.module_bytes
    counted = {name: m.adapter_bytes for name, m in result.modules.items() if m.adapter_bytes}
    if stored != counted:
        differ = sorted(set(stored.items()) ^ set(counted.items()))
        raise ExportError(f"the adapter file holds {sum(stored.values()):,} bytes of tensors, the compression report "
                          f"counted {result.adapter_bytes:,} (first difference, module and bytes: {differ[0]})")
