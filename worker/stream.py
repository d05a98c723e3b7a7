"""Layer sources: where the layer loop gets its decoder layers from (DESIGN, "The layer loop").

ModelLayers hands out the layers of a model loaded whole (worker.models.load_model). StreamedLayers
never holds the whole model: the CausalLM is built from its config with every parameter on the meta
device (buffers such as rotary frequencies are real, they are small), the checkpoint's safetensors
are read one tensor at a time (memory-mapped), and a decoder layer is materialised in the compute
dtype only while a walk holds it (`with source.layer(i) as layer:`), then released back to meta.
Embeddings, final norm and lm_head are materialised the same way, only while a step needs them
(`with source.parts("embed_tokens", "final_norm"):`).

A finished (compressed) layer goes to a LayerStore on disk, one safetensors file per layer holding
what worker.resume checkpoints of it (its modules' weights, codes, adapter factors; a rank-budget
plan's walk-1 residuals) and the module records in the file's metadata. From then on, materialising
that layer reads its other tensors (norms) from the checkpoint and its compressed modules from the
store, so evaluation after compression and the export see exactly the compressed layer.

Peak host memory is then one decoder layer (twice while it is being compressed: the original and
the compressed weights), the embeddings or the head, and the calibration activations; it does not
grow with the number of layers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.linear_compress import CompensatedLinear
from worker.memory import trim_heap
from worker.models import Architecture, ModelLoadError, architecture_for_type, check_model_folder, get_architecture

RECORDS_KEY = "squeeze.records"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class ModelLayers:
    """The layers of a model held whole in memory: nothing to materialise or release."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = get_architecture(model)
        self.layers = self.arch.decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def parts(self, *names: str) -> Iterator[None]:
        yield

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        yield self.layers[index]

    def finish(self, index: int, layer: nn.Module, tensors: dict[str, Tensor], records: dict[str, Any]) -> None:
        """A finished layer stays in the model."""

    def stored_tensors(self, index: int) -> dict[str, Tensor]:
        return {}


class CheckpointReader:
    """The tensors of a model folder's *.safetensors, read one at a time.

    Read with plain file reads, not memory-mapped (safetensors' safe_open maps the file, and every page a
    mapping has touched counts in the process's resident memory until the kernel drops it, so a job
    that reads the whole checkpoint once would show the whole checkpoint in its peak RSS). The file's
    pages still go through the page cache, which the kernel reclaims under pressure.
    """

    def __init__(self, source: Path):
        """source: a folder (its *.safetensors) or one .safetensors file."""
        self.where: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # key -> (file, data start, header entry)
        self.metadata: dict[str, str] = {}  # the files' __metadata__, merged
        for path in [source] if source.is_file() else sorted(source.glob("*.safetensors")):
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, entry in header.items():
                self.where[key] = (path, 8 + length, entry)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """One tensor as stored, converted to dtype (floating tensors only)."""
        path, start, entry = self.where[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            f.readinto(buffer)
        stored = SAFETENSORS_DTYPES[entry["dtype"]]
        tensor = torch.frombuffer(buffer, dtype=stored) if buffer else torch.empty(0, dtype=stored)
        tensor = tensor.reshape(entry["shape"])
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (that of most of its floating tensors' elements)."""
        from math import prod

        counts: dict[torch.dtype, int] = {}
        for _, _, entry in self.where.values():
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + prod(entry["shape"])
        if not counts:
            raise ModelLoadError("the checkpoint holds no floating-point tensors")
        return max(counts, key=lambda d: counts[d])


class LayerStore:
    """Finished decoder layers on disk: layer-<i>.safetensors per layer (see the module doc)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.saved: set[int] = set()

    def path(self, index: int) -> Path:
        return self.folder / f"layer-{index}.safetensors"

    def save(self, index: int, tensors: dict[str, Tensor], records: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f".layer-{index}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={RECORDS_KEY: json.dumps(records)})
        tmp.replace(self.path(index))
        self.saved.add(index)

    def load(self, index: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, module records by relative name) of a saved layer, each tensor in memory of its own.

        Not through safe_open: its tensors live in a mapping of the file, and the export keeps every
        layer's adapter factors to the end, which would keep every stored layer's touched pages (its
        weights and codes too) resident until then."""
        reader = CheckpointReader(self.path(index))
        return {key: reader.get(key) for key in reader.where}, json.loads(reader.metadata[RECORDS_KEY])


class StreamedLayers:
    """A model read from its checkpoint one decoder layer at a time; see the module doc.

    dtype: the compute dtype every floating tensor is materialised in (None: the checkpoint's own).
    reader: where tensors come from (default: the folder's safetensors as stored).
    store_dir: where finished layers go (the job's work folder). held / peak_held count the decoder
    layers materialised now and at most at once (tests check it stays 1).
    """

    streamed = True

    def __init__(self, folder: str | Path, store_dir: Path, dtype: torch.dtype | None = None,
                 reader: CheckpointReader | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        check_model_folder(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        architecture_for_type(config.model_type)  # fail before reading any weight
        self.reader = reader or CheckpointReader(folder)
        self.dtype = dtype or self.reader.dtype()
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=False)
        self.model = model.eval()
        self.arch: Architecture = get_architecture(model)
        self.layers = self.arch.decoder_layers(model)
        self.store = LayerStore(store_dir)
        self.held = 0
        self.peak_held = 0
        self._tied = dict(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else {}

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def parts(self, *names: str) -> Iterator[None]:
        """The named parts (embed_tokens, final_norm, lm_head) materialised from the checkpoint meanwhile."""
        modules = [(getattr(self.arch, name), self.arch.module(self.model, name)) for name in names]
        try:
            for prefix, module in modules:
                self._load(module, prefix)
            yield
        finally:
            for _, module in modules:
                _release(module)
            trim_heap()

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` materialised on the CPU: from the store once finished, else the checkpoint."""
        from worker.resume import restore_module

        layer = self.layers[index]
        self.held += 1
        self.peak_held = max(self.peak_held, self.held)
        try:
            tensors, records = self.store.load(index) if index in self.store.saved else ({}, {})
            # A stored module's weight is not read from the checkpoint: restore_module overwrites it.
            self._load(layer, f"{self.arch.layers}.{index}", empty={f"{relative}.weight" for relative in records})
            for relative, record in records.items():
                restore_module(layer, relative, relative, tensors, record)
            del tensors
            yield layer
        finally:
            _unwrap(layer)
            _release(layer)
            self.held -= 1
            trim_heap()

    def finish(self, index: int, layer: nn.Module, tensors: dict[str, Tensor], records: dict[str, Any]) -> None:
        """Keep a finished layer's compressed modules in the store (records: worker.resume.report_record
        by module name relative to the layer)."""
        self.store.save(index, tensors, records)

    def stored_tensors(self, index: int) -> dict[str, Tensor]:
        return self.store.load(index)[0] if index in self.store.saved else {}

    def _load(self, module: nn.Module, prefix: str, empty: set[str] = frozenset()) -> None:
        """Every parameter of module from the checkpoint (those named in `empty`: allocated, not read)."""
        for name, param in list(module.named_parameters()):
            if name in empty:
                _set_parameter(module, name, torch.empty(param.shape, dtype=self.dtype))
                continue
            key = f"{prefix}.{name}"
            source = key if key in self.reader else self._tied.get(key)
            if source is None or source not in self.reader:
                raise ModelLoadError(f"the checkpoint has no tensor {key}")
            tensor = self.reader.get(source, self.dtype)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelLoadError(f"{key}: the checkpoint's shape {tuple(tensor.shape)} is not the config's "
                                     f"{tuple(param.shape)}")
            _set_parameter(module, name, tensor)


def _set_parameter(module: nn.Module, name: str, tensor: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _release(module: nn.Module) -> None:
    """Every parameter of module back to an empty meta tensor of the same shape (buffers are not read from
    the checkpoint, they stay as the config built them)."""
    for owner in module.modules():
        for leaf, param in list(owner._parameters.items()):
            if param is not None:
                owner._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _unwrap(layer: nn.Module) -> None:
    """Plain Linears back in place of CompensatedLinears (the adapters are in the store)."""
    for name, module in list(layer.named_modules()):
        if isinstance(module, CompensatedLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module.base)
