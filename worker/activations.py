"""The calibration activations between decoder layers: captured, held where the job placed them, and
carried through one layer at a time.

The layer loop keeps one tensor (b, seq_len, hidden) per batch of windows, in the model dtype, from
one decoder layer to the next. Where they live between layers is a placement (Settings.activations):
- "device": on the compute device, so a layer's forward reads and writes them there (no round trip
  to the host per layer);
- "host": in CPU memory;
- "disk": one safetensors file per batch in a folder of the job's scratch space, read back when the
  next forward needs that batch and overwritten by its output; the folder is removed when the walk
  ends. Host memory then holds one batch at a time.
The numbers are the same whatever the placement: only where the same tensors are kept changes.
"auto" picks, once per job (decide_placement), the device when the activations and one layer's
working set fit its free memory, else the host when they fit its available memory with a margin,
else the disk. On the CPU the device is the host, so "auto" there picks host or disk.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.memory import GiB, activation_bytes, host_available, minimum_need
from worker.models import Architecture
from worker.stream import SAFETENSORS_DTYPES

Where = Literal["device", "host", "disk"]
Setting = Literal["auto", "device", "host", "disk"]  # Settings.activations
CPU = torch.device("cpu")
DEVICE_SHARE = 0.9  # of the device's free memory "auto" lets activations and a layer's working set take
HOST_SHARE = 0.8  # of host_available(): the job's host need is a lower bound, its peak is higher
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    """Where a walk keeps its activations; folder: under which a "disk" walk makes its own folder."""

    where: Where = "host"
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.where == "disk" and self.folder is None:
            raise ValueError("the disk placement needs a folder for its files")


HOST = Placement()


class Activations:
    """One tensor per batch of windows, kept where the placement says; `activations[b] = t` stores t there
    (moved, or written to disk), `activations[b]` gives it back (read from disk). Close it (or use it
    as a context manager) to free what it holds and remove its files."""

    def __init__(self, placement: Placement, device: torch.device):
        self.where = placement.where
        self.home = device if placement.where == "device" else CPU
        self._tensors: list[Tensor | None] = []  # None per batch when on disk
        self._layouts: list[tuple[torch.Size, torch.dtype]] = []  # per batch
        self._folder: Path | None = None
        if placement.where == "disk" and placement.folder is not None:
            placement.folder.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="activations-", dir=placement.folder))

    def __len__(self) -> int:
        return len(self._layouts)

    def __getitem__(self, b: int) -> Tensor:
        if self._folder is None:
            tensor = self._tensors[b]
            assert tensor is not None
            return tensor
        return load_file(self._path(b))["hidden"]

    def __setitem__(self, b: int, tensor: Tensor) -> None:
        self._layouts[b] = (tensor.shape, tensor.dtype)
        if self._folder is None:
            self._tensors[b] = tensor.to(self.home)
        else:  # a new file renamed over the old: a tensor still read from the old one stays intact
            tmp = self._path(b).with_suffix(".tmp")
            save_file({"hidden": tensor.to(CPU).contiguous()}, str(tmp))
            tmp.replace(self._path(b))

    def __iter__(self) -> Iterator[Tensor]:
        for b in range(len(self)):
            yield self[b]

    def append(self, tensor: Tensor) -> None:
        self._tensors.append(None)
        self._layouts.append((tensor.shape, tensor.dtype))
        self[len(self) - 1] = tensor

    def overwrite(self, batches: Iterable[Tensor]) -> None:
        """Every batch replaced, in order (e.g. by a checkpoint's); as many as there are."""
        count = 0
        for b, tensor in enumerate(batches):
            if b >= len(self):
                raise ValueError(f"more batches than the {len(self)} held")
            self[b] = tensor
            count += 1
        if count != len(self):
            raise ValueError(f"{count} batches given for the {len(self)} held")

    def write(self, path: Path, prefix: str = "hidden.") -> None:
        """Every batch into one safetensors file (keys prefix0, prefix1, ...) with one batch in host memory
        at a time: the header is made from the batches' shapes and dtypes, their bytes follow in order."""
        header, offset = {}, 0
        for b, (shape, dtype) in enumerate(self._layouts):
            size = prod(shape) * dtype.itemsize
            header[f"{prefix}{b}"] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                                      "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for tensor in self:
                f.write(tensor.to(CPU).contiguous().flatten().view(torch.uint8).numpy().data)

    def close(self) -> None:
        self._tensors.clear()
        self._layouts.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Activations:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, b: int) -> Path:
        assert self._folder is not None
        return self._folder / f"batch-{b}.safetensors"


@contextmanager
def closed_on_error(activations: Activations):
    """Activations freed (their files removed) when the walk making them fails."""
    try:
        yield activations
    except BaseException:
        activations.close()
        raise


# --- which placement a job takes -----------------------------------------------------------------------


def choose_placement(setting: Setting, activation_bytes: int, device_need: int, host_need: int, on_cpu: bool,
                     device_free: int | None, host_free: int | None) -> Where:
    """Settings.activations resolved: a fixed setting as it is; "auto" as in the module doc. device_need and
    host_need: what the job holds there besides the activations (worker.memory.minimum_need); a free
    amount that cannot be read (None) counts as fitting on the host and as not fitting on the device."""
    if setting != "auto":
        return setting
    if not on_cpu and device_free is not None and activation_bytes + device_need <= device_free * DEVICE_SHARE:
        return "device"
    if host_free is None or activation_bytes + host_need <= host_free * HOST_SHARE:
        return "host"
    return "disk"


def decide_placement(setting: Setting, config, num_windows: int, seq_len: int, *, device: torch.device, streamed: bool,
                     dtype_bytes: int, batch_size: int = 8) -> tuple[Where, int, str]:
    """(placement, activation bytes, why) for a job whose largest walk has num_windows x seq_len tokens."""
    on_cpu = device.type == "cpu"
    rest = minimum_need(config, num_windows, seq_len, batch_size, on_cpu=on_cpu, streamed=streamed,
                        dtype_bytes=dtype_bytes, activations="disk")  # everything but the activations
    size = activation_bytes(config, num_windows, seq_len, dtype_bytes)
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    host_free = host_available()
    where = choose_placement(setting, size, rest.device_bytes, rest.host_bytes, on_cpu, device_free, host_free)
    if setting != "auto":
        why = f"Settings.activations = {setting!r}"
    else:
        free = [f"{device} {device_free / GiB:.2f} GiB free" if device_free is not None else None,
                f"host {host_free / GiB:.2f} GiB available" if host_free is not None else None]
        why = "auto: " + (", ".join(part for part in free if part) or "free memory unknown")
    return where, size, why


# --- capturing and propagating -------------------------------------------------------------------------


@dataclass
class LayerInputs:
    """The current decoder layer's inputs, per batch of windows."""

    hidden: Activations  # per batch (b, seq_len, hidden) in the model dtype, where the placement keeps them
    layer_kwargs: list[list[dict]]  # [batch][layer] keyword arguments the base model passes the layer


class _InputRecorder(nn.Module):
    """Stands in for a decoder layer while inputs are captured: records its call, returns its input."""

    def __init__(self, calls: list[dict]):
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states by keyword")
        self.calls.append({"hidden_states": hidden_states, **kwargs})
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, arch: Architecture, windows: Tensor, batch_size: int,
                         placement: Placement = HOST, device: torch.device = CPU) -> LayerInputs:
    """Layer 0's inputs (placed as `placement` says, batch by batch as they are made) and every layer's
    keyword arguments, from the base model's forward on CPU.

    The decoder layers are swapped for identity recorders, so this costs the embeddings, masks,
    rotary embeddings and final norm only (no lm_head).
    """
    layers = arch.decoder_layers(model)
    base_model = arch.module(model, "base_model")
    calls: list[list[dict]] = [[] for _ in layers]
    originals = list(layers)
    hidden = Activations(placement, device)
    try:
        for i in range(len(layers)):
            layers[i] = _InputRecorder(calls[i])
        for batch in windows.split(batch_size):
            base_model(input_ids=batch, use_cache=False)
            hidden.append(calls[0][-1].pop("hidden_states"))
            for per_layer in calls[1:]:
                per_layer[-1].pop("hidden_states")
    except BaseException:
        hidden.close()
        raise
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    layer_kwargs = [[calls[layer][b] for layer in range(len(layers))] for b in range(len(hidden))]
    return LayerInputs(hidden=hidden, layer_kwargs=layer_kwargs)


@torch.no_grad()
def forward_layer(layer: nn.Module, inputs: LayerInputs, index: int, device: torch.device, keep_outputs: bool) -> None:
    """Run every batch through decoder layer `index` (already on device).

    keep_outputs: replace inputs.hidden by the layer's outputs (propagation); otherwise the forward
    only feeds whatever hooks are registered.
    """
    for b, hidden in enumerate(inputs.hidden):
        kwargs = _to_device(inputs.layer_kwargs[b][index], device, {})
        out = layer(hidden.to(device), **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        if keep_outputs:
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"decoder layer {index} produced non-finite activations")
            inputs.hidden[b] = out


def _to_device(obj, device: torch.device, memo: dict):
    """Tensors inside (nested) kwargs moved to device; a tensor shared between entries moves once."""
    if isinstance(obj, Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device, memo) for v in obj)
    return obj
