"""The export of a streamed run (worker.stream.StreamedLayers), one decoder layer at a time.

The files are the ones worker.export.checkpoint writes from a model held whole, byte for byte: the
same config.json (with compressed-tensors' quantization_config), the same tensors under the same
names, packed by compressed-tensors the same way and checked against our codes the same way, and
the same safetensors layout. How: each finished layer is materialised from the layer store,
packed by compressed-tensors inside a holder module that gives it its full dotted path, and its
tensors written to a part file in the work folder; the embeddings, final norm and (untied) head
are copied from the checkpoint's bytes when it stores them in the compute dtype (else converted one
tensor at a time into parts of their own); then model.safetensors (or transformers' shards,
split by the same rule) is assembled from the parts' bytes, tensor by tensor, in safetensors' own
order (dtype, then name) with its own header format. Host memory: one layer and a copy buffer.
The adapter factors of every module are collected on the way (rank x (d_in + d_out) fp16 each).
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.compression.quantize import QuantizedWeight
from worker.export.checkpoint import (
    PACK_QUANTIZED,
    CheckpointInfo,
    ExportError,
    _check_grids,
    _check_packed_codes,
    _quantization_config,
    _quantized_modules,
    _set_grids,
    dense_info,
    quantized_info,
    stored_schemes,
)
from worker.linear_compress import CompensatedLinear
from worker.plan import CompressionPlan, CompressionResult
from worker.stream import SAFETENSORS_DTYPES

MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
COPY_CHUNK = 64 * 1024**2


def save_checkpoint_streamed(source, tokenizer, result: CompressionResult, plan: CompressionPlan, out_dir: Path,
                             parts_dir: Path, adapters: dict) -> CheckpointInfo:
    """Write config, weights and tokenizer into out_dir from a streamed run's source (consumed: its
    layers are left in compressed-tensors' form); adapters: filled with {full Linear name: adapter}."""
    model, arch = source.model, source.arch
    parts_dir.mkdir(parents=True, exist_ok=True)
    info = dense_info()
    config = compressor = None
    if plan.quant is not None:
        schemes = stored_schemes(result, plan)
        config = _quantization_config(model, _quantized_modules(result), schemes)
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config

        skeleton = copy.deepcopy(model)  # all on meta: only for the config the compressor writes
        apply_quantization_config(skeleton, config, show_progress=False)
        compressor = ModelCompressor.from_pretrained_model(skeleton, quantization_format=PACK_QUANTIZED)
        info = quantized_info(schemes)

    order: list[str] = []  # tensor names in the state dict order of a model held whole
    parts: list[Path] = []
    rest = _rest_tensors(source)
    layer_prefix = f"{arch.layers}."
    emitted_rest = False
    for index in range(len(source)):
        names = _export_layer(source, index, result, plan, config, parts_dir, adapters)
        if not emitted_rest:  # the parts registered before the layers (embeddings) come first
            order += [name for name in rest if _before_layers(model, name, layer_prefix)]
            emitted_rest = True
        order += names
        parts.append(parts_dir / f"layer-{index}.safetensors")
    order += [name for name in rest if not _before_layers(model, name, layer_prefix)]
    copied = _rest_parts(source, rest, parts_dir, parts)

    # What model.save_pretrained writes besides the weights.
    model.config.dtype = str(source.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    write_checkpoint(parts, order, out_dir, copied)
    if compressor is not None:
        from compressed_tensors.quantization import QuantizationStatus

        # What compress_model sets on a whole model's compressor; each layer was compressed by its own.
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        compressor.update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    return info


def _export_layer(source, index: int, result: CompressionResult, plan: CompressionPlan, config, parts_dir: Path,
                  adapters: dict) -> list[str]:
    """Layer `index` packed and written to parts_dir/layer-<i>.safetensors; its tensor names in order."""
    arch = source.arch
    prefix = f"{arch.layers}.{index}"
    stored = source.stored_tensors(index)
    with source.layer(index) as layer:
        holder = _holder(prefix, layer)
        for name, module in list(layer.named_modules()):
            if isinstance(module, CompensatedLinear):
                adapters[f"{prefix}.{name}"] = module.adapter()
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, module.base)
        if config is not None:
            from compressed_tensors.compressors import ModelCompressor
            from compressed_tensors.quantization import apply_quantization_config

            quantized = {}
            for name in result.modules:
                if name.startswith(prefix + "."):
                    relative = name[len(prefix) + 1:]
                    q = result.modules[name].quantized
                    quantized[name] = QuantizedWeight(
                        weight=layer.get_submodule(relative).weight.detach(), codes=stored[f"{relative}.codes"],
                        scales=stored[f"{relative}.scales"], zeros=stored[f"{relative}.zeros"],
                        group_size=q.group_size, bits=q.bits)
            _check_grids(quantized, plan)
            apply_quantization_config(holder, config, show_progress=False)
            _set_grids(holder, quantized)
            ModelCompressor.from_pretrained_model(holder, quantization_format=PACK_QUANTIZED).compress_model(holder)
            _check_packed_codes(holder, quantized, plan)
        state = holder.state_dict()
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(parts_dir / f"layer-{index}.safetensors"),
                  metadata={"format": "pt"})
        return list(state)


class _Holder(nn.Module):
    pass


def _holder(prefix: str, layer: nn.Module) -> nn.Module:
    """A module tree in which `layer` sits at the dotted path `prefix` (so its names are the full ones)."""
    root = _Holder()
    node = root
    parts = prefix.split(".")
    for part in parts[:-1]:
        child = _Holder()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], layer)
    return root


def _rest_tensors(source) -> list[str]:
    """Names of the state dict entries outside the decoder layers that save_pretrained writes (tied
    weights left out), in state dict order."""
    tied = set(getattr(source, "_tied", {}))
    prefix = f"{source.arch.layers}."
    return [name for name in source.model.state_dict(keep_vars=True) if not name.startswith(prefix)
            and name not in tied]


def _before_layers(model: nn.Module, name: str, layer_prefix: str) -> bool:
    names = list(model.state_dict(keep_vars=True))
    first_layer = next(i for i, n in enumerate(names) if n.startswith(layer_prefix))
    return names.index(name) < first_layer


def _rest_parts(source, names: list[str], parts_dir: Path, parts: list[Path]) -> dict[str, tuple[Path, int, dict]]:
    """Where the tensors outside the layers come from: a parameter stored in the compute dtype is copied
    byte for byte from the checkpoint (returned: name -> (file, data start, header entry)); any other
    (converted parameter, persistent buffer) is written to a part file of its own, one at a time."""
    from safetensors.torch import save_file

    state = source.model.state_dict(keep_vars=True)
    copied = {}
    for number, name in enumerate(names):
        value = state[name]
        if isinstance(value, nn.Parameter) or value.device.type == "meta":
            path, start, entry = source.reader.where[name]
            if SAFETENSORS_DTYPES[entry["dtype"]] in (source.dtype, *NOT_CONVERTED):
                copied[name] = (path, start, entry)
                continue
            value = source.reader.get(name, source.dtype)
        part = parts_dir / f"rest-{number}.safetensors"
        save_file({name: value.detach().contiguous()}, str(part), metadata={"format": "pt"})
        parts.append(part)
    return copied


NOT_CONVERTED = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)  # CheckpointReader.get


# --- safetensors assembled from parts, as safetensors and transformers write it -------------------------


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, the header without __metadata__)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def write_checkpoint(parts: list[Path], order: list[str], out_dir: Path,
                     copied: dict[str, tuple[Path, int, dict[str, Any]]]) -> None:
    """model.safetensors (or shards of at most MAX_SHARD_SIZE plus model.safetensors.index.json, split as
    save_pretrained splits them) from the tensors in the part files and those `copied` from elsewhere
    (name -> (safetensors file, its data start, the tensor's header entry)); `order`: state dict order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    where: dict[str, tuple[Path, int, dict[str, Any]]] = dict(copied)
    for path in parts:
        start, header = read_header(path)
        for name, entry in header.items():
            where[name] = (path, start, entry)
    if set(where) != set(order):
        raise ExportError(f"the parts hold tensors {sorted(set(where) ^ set(order))[:3]} not in the model's state dict")
    stand_ins = {name: torch.empty(where[name][2]["shape"], dtype=SAFETENSORS_DTYPES[where[name][2]["dtype"]],
                                   device="meta") for name in order}
    split = split_torch_state_dict_into_shards(stand_ins, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        _write_file(out_dir / filename, [(name, *where[name]) for name in names])
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_file(path: Path, entries: list[tuple[str, Path, int, dict[str, Any]]]) -> None:
    """One safetensors file: safetensors' tensor order and compact header (padded with spaces to 8 bytes),
    then each tensor's bytes copied from its part."""
    by_name = {entry[0]: entry for entry in entries}
    ordered = [by_name[name] for name in _safetensors_order({name: e[3]["dtype"] for name, e in by_name.items()})]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, _, entry in ordered:
        begin, end = entry["data_offsets"]
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for _, part, start, entry in ordered:
            begin, end = entry["data_offsets"]
            with open(part, "rb") as f:
                f.seek(start + begin)
                left = end - begin
                while left:
                    chunk = f.read(min(COPY_CHUNK, left))
                    out.write(chunk)
                    left -= len(chunk)
    tmp.replace(path)


def _safetensors_order(dtypes: dict[str, str]) -> list[str]:
    """The order safetensors writes tensors in (by dtype, then name), asked of safetensors itself with
    one-element stand-ins."""
    from safetensors.torch import save

    blob = save({name: torch.zeros(1, dtype=SAFETENSORS_DTYPES[dtype]) for name, dtype in dtypes.items()})
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def layer_logits(source, windows: Tensor, device: torch.device, batch_size: int = 4) -> Tensor:
    """reference_logits of a streamed run: (num_windows, seq_len, vocab) in the compute dtype, on CPU,
    computed layer by layer."""
    from worker.evaluate import iter_logits

    return torch.cat([logits.to(source.dtype).cpu() for _, logits in iter_logits(source, windows, device, batch_size)])
