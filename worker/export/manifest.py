"""squeeze.json (what was done, with what, and which engines can serve it) and the README.md model card."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.engines import VLLM_FUSED, VLLM_WNA16_BITS
from worker.export.adapter import (
    ADAPTER_DIR,
    DEQUANTIZE_RECIPE,
    QUANTIZED_NAME,
    WEIGHTS_NAME,
    AdapterInfo,
    vllm_max_lora_rank,
)
from worker.export.checkpoint import MIXED_LOAD_RECIPE, PACK_QUANTIZED, CheckpointInfo
from worker.plan import CompressionPlan, CompressionResult
from worker.storage import MANIFEST_NAME, sha256_file

CARD_NAME = "README.md"
FORMAT_VERSION = 1
# What the pipeline passes in manifest_extra: the job spec, {"id", "revision", ...} of the source
# model, the calibration windows' description with their hash, and the evaluation results.
REQUIRED_EXTRA = ("job", "model", "calibration", "evaluation")
LIBRARIES = ("squeeze", "torch", "transformers", "compressed-tensors", "peft", "safetensors")
MARLIN_GROUP_SIZES = (None, 32, 64, 128)  # None = per channel
COMPUTED_KEYS = frozenset({"format_version", "created_at", "libraries", "plan", "checkpoint", "adapter", "modules",
                           "serving", "notes", "files"})


def serving(checkpoint: CheckpointInfo, plan: CompressionPlan, adapter: AdapterInfo | None) -> tuple[dict, list[str]]:
    """(which engines load this artifact and how, notes a user should read)."""
    notes: list[str] = []
    vllm: dict[str, Any] = {"serves": True}
    if checkpoint.format == PACK_QUANTIZED:
        vllm, notes = _vllm_weights(checkpoint)
    else:
        vllm["scheme"] = "unquantized (dense weights)"
    if plan.sparsity is not None:
        pattern = plan.sparsity.pattern
        notes.append(f"{pattern} sparsity is stored as explicit zeros in ordinary weights: compressed-tensors writes "
                     "no sparse formats and vLLM no longer accelerates 2:4 sparsity, so the zeros bring no speed-up "
                     "or memory saving in vLLM; the artifact serves at dense speed.")
    transformers: dict[str, Any] = {"loads": True}
    if checkpoint.mixed:
        transformers["recipe"] = "the model card's mixed-precision recipe"
        notes.append("mixed precision: transformers' CompressedTensorsConfig(dequantize=True) dequantizes every layer "
                     "with one config group's scheme and fails on this checkpoint; load it with the model card's "
                     "recipe (compressed-tensors dequantizes each group with its own scheme).")
    elif checkpoint.format == PACK_QUANTIZED:
        transformers["quantization_config"] = "CompressedTensorsConfig(dequantize=True)"
        if not checkpoint.symmetric:
            notes.append("asymmetric weights: load with quantization_config=CompressedTensorsConfig(dequantize=True) "
                         "as the model card shows; a plain AutoModelForCausalLM.from_pretrained(path) fails on "
                         "the weight_zero_point shapes (compressed-tensors 0.20, transformers 5.24).")
    engines: dict[str, Any] = {"transformers": transformers, "vllm": vllm}
    if adapter is not None:
        engines["peft"] = {"loads": True, "adapter": adapter.path}
        if adapter.quantized:
            engines["peft"]["after"] = "the model card's dequantize recipe (writes adapter_model.safetensors)"
        max_lora_rank = vllm_max_lora_rank(adapter.max_rank)
        if max_lora_rank is None:
            vllm["lora"] = False
            notes.append(f"adapter rank {adapter.max_rank} exceeds vLLM's largest --max-lora-rank (512).")
        else:
            vllm["lora"] = {"enable_lora": True, "max_lora_rank": max_lora_rank}
        if adapter.quantized:
            notes.append(f"the adapter is stored as {adapter.stored_dtype} in {ADAPTER_DIR}/{QUANTIZED_NAME} "
                         f"({adapter.stored_bytes:,} bytes); PEFT and vLLM load fp16 LoRA files, so run the model "
                         f"card's recipe first: it writes {ADAPTER_DIR}/{WEIGHTS_NAME} (fp16, "
                         f"{adapter.served_bytes:,} bytes, what an engine holds in memory).")
    return engines, notes


def _vllm_weights(checkpoint: CheckpointInfo) -> tuple[dict[str, Any], list[str]]:
    """Whether vLLM's compressed-tensors WNA16 scheme loads these weights, and the notes on why (not)."""
    notes: list[str] = []
    bits = sorted({scheme.bits for scheme in checkpoint.schemes})
    unserved = [b for b in bits if b not in VLLM_WNA16_BITS]
    width = "/".join(str(b) for b in bits)
    if unserved:
        notes.append(f"{'/'.join(map(str, unserved))}-bit weights: load with transformers (dequantized); vLLM is not "
                     "claimed to serve them.")
        return {"serves": False, "reason": f"vLLM's compressed-tensors WNA16 scheme serves 4- and 8-bit weights; "
                                           f"this checkpoint is {width}-bit"}, notes
    split = _split_fusions(checkpoint)
    if split:
        return {"serves": False, "reason": f"vLLM fuses q/k/v and gate/up into one layer and needs one scheme per "
                                           f"fused set; {split} differ"}, notes
    schemes = " + ".join(f"W{b}A16" for b in bits)
    kind = "mixed, one config group per scheme" if checkpoint.mixed else "compressed-tensors pack-quantized"
    odd = sorted({s.group_size for s in checkpoint.schemes if s.group_size not in MARLIN_GROUP_SIZES})
    if odd:
        notes.append(f"group size {'/'.join(map(str, odd))}: vLLM's Marlin kernels take per-channel or groups of "
                     "32/64/128; other group sizes may be refused or run on slower kernels.")
    return {"serves": True, "scheme": f"{schemes} ({kind})"}, notes


def _split_fusions(checkpoint: CheckpointInfo) -> str | None:
    """The first set of Linears vLLM fuses (its packed_modules_mapping) that the checkpoint stores with
    different schemes, as "a, b"; None when every fused set shares one."""
    scheme_of = {name: number for number, scheme in enumerate(checkpoint.schemes) for name in scheme.modules}
    for name in scheme_of:
        parent, _, child = name.rpartition(".")
        for fused in VLLM_FUSED:
            members = [f"{parent}.{member}" for member in fused if f"{parent}.{member}" in scheme_of]
            if child in fused and len({scheme_of[member] for member in members}) > 1:
                return ", ".join(members)
    return None


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_checksums(out_dir: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} for every file under out_dir, sorted."""
    checksums = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(out_dir).as_posix()
        if relative in exclude:
            continue
        checksums[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return checksums


def build_manifest(result: CompressionResult, plan: CompressionPlan, checkpoint: CheckpointInfo,
                   adapter: AdapterInfo | None, manifest_extra: dict[str, Any]) -> dict[str, Any]:
    """Everything but the file checksums (added last, once every other file is written)."""
    check_manifest_extra(manifest_extra)
    engines, serving_notes = serving(checkpoint, plan, adapter)
    notes = result.notes + serving_notes  # what the run itself noted (capped ranks, ...) comes first
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        "plan": asdict(plan),
        "checkpoint": asdict(checkpoint),
        "adapter": None if adapter is None else {"path": adapter.path, "r": adapter.r, "max_rank": adapter.max_rank,
                                                 **adapter.sizes()},
        "modules": {
            name: {"rank": m.rank, "adapter_bits": m.adapter_bits, "error_before": m.error_before,
                   "error_after": m.error_after,
                   "sparsity": m.sparsity, "zero_fraction": m.zero_fraction,
                   "bits": m.quantized and m.quantized.bits, "group_size": m.quantized and m.quantized.group_size}
            for name, m in result.modules.items()
        },
        "serving": engines,
        "notes": notes,
    }
    return {**manifest, **manifest_extra}


def check_manifest_extra(manifest_extra: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_EXTRA if key not in manifest_extra]
    if missing:
        raise ValueError(f"manifest_extra lacks {', '.join(missing)} (expected keys: {', '.join(REQUIRED_EXTRA)})")
    clash = sorted(set(manifest_extra) & COMPUTED_KEYS)
    if clash:
        raise ValueError(f"manifest_extra may not set {', '.join(clash)}: Squeeze computes those")


def write_manifest(manifest: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Add the checksums of every other file and write squeeze.json; returns the written manifest."""
    manifest = {**manifest, "files": file_checksums(out_dir)}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return manifest


def model_card(manifest: dict[str, Any]) -> str:
    """README.md: what this is and how to load it with transformers, PEFT and vLLM."""
    checkpoint, adapter, engines = manifest["checkpoint"], manifest["adapter"], manifest["serving"]
    model = manifest["model"]
    quantized = checkpoint["format"] == PACK_QUANTIZED
    tags = ["squeeze", "compressed-tensors" if quantized else "pruned"] + (["eora", "lora"] if adapter else [])
    front = ["---", "library_name: transformers", "tags:"] + [f"- {tag}" for tag in tags]
    if model.get("source") == "hub" and model.get("id"):
        front.append(f"base_model: {model['id']}")
    front.append("---")

    what = []
    if quantized:
        what += [f"- weights: {_scheme_text(scheme)} (compressed-tensors `pack-quantized`, {len(scheme['modules'])} "
                 "Linear layers)" for scheme in checkpoint["schemes"]]
    sparsity = manifest["plan"]["sparsity"]
    if sparsity is not None:
        pattern = f"{sparsity['n']}:{sparsity['m']}" if sparsity["n"] is not None else f"{sparsity['ratio']:.0%}"
        what.append(f"- sparsity: {pattern} ({sparsity['method']}), stored as zeros in the weights")
    if adapter:
        what.append(f"- compensation: {manifest['plan']['compensation']['method']} low-rank adapter in `adapter/` "
                    f"(PEFT LoRA, rank up to {adapter['max_rank']}, {adapter['params']:,} parameters; stored as "
                    f"{adapter['stored_dtype']}, {adapter['stored_bytes']:,} bytes = "
                    f"{adapter['stored_bits_per_param']:.2f} bits per parameter; served in fp16, "
                    f"{adapter['served_bytes']:,} bytes)")
    evaluation = manifest["evaluation"]
    if evaluation:
        what.append("- evaluation: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in evaluation.items()
                                                 if not isinstance(v, (dict, list))))

    mixed = len(checkpoint["schemes"]) > 1
    load = "AutoModelForCausalLM.from_pretrained(path" + (
        ", quantization_config=CompressedTensorsConfig(dequantize=True))" if quantized else ")")
    imports = "from transformers import AutoModelForCausalLM, AutoTokenizer" + (
        ", CompressedTensorsConfig" if quantized else "")
    lines = [*front, "", f"# {model.get('id', 'model')} compressed by Squeeze", "",
             f"Source revision `{model.get('revision')}`. Details, per-layer errors and file checksums: "
             "`squeeze.json`.",
             "", *what, "", "## transformers", ""]
    if mixed:
        lines += ["Each config group of this mixed-precision checkpoint has its own scheme; transformers' "
                  "`CompressedTensorsConfig(dequantize=True)` applies one scheme to every layer, so load it this "
                  "way (compressed-tensors dequantizes each group's Linears with its scheme):", "",
                  "```python", 'path = "."  # this folder, or a local copy of the Hub repo',
                  MIXED_LOAD_RECIPE.rstrip("\n"), "from transformers import AutoTokenizer",
                  "tokenizer = AutoTokenizer.from_pretrained(path)", "```"]
    else:
        lines += ["```python", imports, 'path = "."  # this folder, or the Hub repo id', f"model = {load}",
                  "tokenizer = AutoTokenizer.from_pretrained(path)", "```"]
    if quantized and not mixed:
        lines += ["", "`dequantize=True` (formerly `run_compressed=False`) unpacks the integer weights once at load, "
                      "so the model runs on any device, CPU included. Keep it: without it, transformers loads "
                      "symmetric checkpoints but fails on asymmetric ones (`weight_zero_point` shape mismatch)."]
    quantized_adapter = bool(adapter) and adapter["file"].endswith(QUANTIZED_NAME)
    first = " (after the recipe above)" if quantized_adapter else ""
    if quantized_adapter:
        lines += ["", "## The quantized adapter", "",
                  f"`{adapter['file']}` holds the adapter as {adapter['stored_dtype']} (packed, low bits first). "
                  f"PEFT and vLLM read fp16 LoRA files: this writes `{ADAPTER_DIR}/{WEIGHTS_NAME}` next to it "
                  "(only torch and safetensors), the exact fp16 values the compressed model was evaluated with.",
                  "", "```python", quantized_adapter_recipe(f'{ADAPTER_DIR}'), "```"]
    if adapter:
        lines += ["", "## PEFT (with the compensation adapter)", "", "```python", "from peft import PeftModel",
                  f'model = PeftModel.from_pretrained(model, f"{{path}}/adapter")  # on the model loaded above{first}',
                  "```",
                  "", "Attach the adapter to the dequantized model: PEFT wraps plain Linear layers. "
                      "`adapter_config.json` names its base as `..` (the folder above), so load the base first as "
                      "shown rather than through AutoPeftModel."]
    vllm = engines["vllm"]
    lines += ["", "## vLLM", ""]
    if vllm["serves"]:
        command = "vllm serve <path>"
        lora = vllm.get("lora")
        if lora:
            command += f" --enable-lora --max-lora-rank {lora['max_lora_rank']} --lora-modules squeeze=<path>/adapter"
        lines += ["```", command, "```", "", f"Scheme: {vllm['scheme']}."]
        if lora and quantized_adapter:
            lines.append(f"Run the recipe above first: vLLM loads `{ADAPTER_DIR}/{WEIGHTS_NAME}`.")
        if lora:
            lines += ["Send requests with `\"model\": \"squeeze\"` to apply the adapter; the base model name serves "
                      "without it."]
    else:
        lines.append(f"Not served: {vllm['reason']}.")
    if manifest["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in manifest["notes"]]
    return "\n".join(lines) + "\n"


def _scheme_text(scheme: dict[str, Any]) -> str:
    group = "per channel" if scheme["group_size"] is None else f"groups of {scheme['group_size']}"
    return f"{scheme['bits']}-bit integers, {'symmetric' if scheme['symmetric'] else 'asymmetric'}, {group}"


def quantized_adapter_recipe(folder: str) -> str:
    """The model card's dequantize recipe for the adapter folder at `folder` (a path as Python source)."""
    return f"folder = {folder!r}  # this artifact's adapter folder\n{DEQUANTIZE_RECIPE}".rstrip("\n")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
