"""Layer checkpoints: what a retried attempt of a job resumes from instead of layer 0.

After each decoder layer the sequential pipeline hands the finished layer to LayerCheckpoints: its
tensors (compressed weights, quantization codes, adapter factors, and for a rank-budget plan's first
walk the residuals and spectra the allocation needs), the next layer's inputs, and the run's
bookkeeping (module reports, counters, notes, allocated ranks). A retried attempt restores layers
0..k-1 from them bit for bit and computes from layer k on exactly what an undisturbed run computes,
so its artifacts are the same bytes.

One job's folder (Settings.checkpoints_dir / <job id>):
    attempt-<a>/state.json                         the commit point (written last, by rename)
    attempt-<a>/<walk>-layer-<i>.safetensors       layer i as that walk left it
    attempt-<a>/<walk>-inputs-<i>.safetensors      the inputs of layer i in that walk
Every file is written under a temporary name and renamed; state.json names the files that belong to
the state, so a crash at any point leaves the previous consistent state, and superseded files are
deleted only after the new state is committed. The folder holds each finished layer once (the
same tensors the export is made of) plus one set of activations.

A new attempt takes over the newest earlier attempt's folder by renaming it to its own: a stale
worker still running that attempt then fails its next write (its folder is gone) instead of mixing
its layers into the new attempt's state. With a store (S3, for workers that share no disk), every
commit is also put under attempt-<a>/ there, and an attempt with no local state downloads the newest
earlier attempt's; it then stores that state under its own attempt and deletes every other one.
A state whose key (hash of the spec, model revision and calibration windows) differs from the new
attempt's is discarded, never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.activations import Activations
from worker.checkpoint_store import ATTEMPT_PREFIX, S3CheckpointStore
from worker.compression.adapters import LowRankAdapter, QuantizedFactor
from worker.compression.quantize import QuantizedWeight
from worker.errors import LostOwnership
from worker.linear_compress import CompensatedLinear, attach_compensation
from worker.plan import ModuleReport

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
FORMAT_VERSION = 1


@dataclass
class ResumePoint:
    """A committed state: `done` layers of `walk` are finished; the rest of the run starts there."""

    folder: Path
    walk: str  # "compress" or "compensate" (a rank-budget plan's second walk)
    done: int  # layers of `walk` finished
    layers: dict[int, str]  # layer index -> file holding its newest tensors
    inputs: str | None  # file holding the inputs of layer `done` of `walk` (None when the walk is complete)
    run: dict[str, Any]  # the sequential run's bookkeeping (see worker.sequential)
    meta: dict[str, Any]  # what the pipeline stored beside it (e.g. the perplexity before)

    def layer_tensors(self, index: int) -> dict[str, Tensor]:
        return load_file(self.folder / self.layers[index])

    def hidden(self) -> Iterator[Tensor] | None:
        """The inputs of layer `done`, per batch, read one batch at a time; None when the walk is complete."""
        return None if self.inputs is None else _read_batches(self.folder / self.inputs)


def open_checkpoints(job_id, spec, settings, attempt: int | None, plan, device: torch.device,
                     revision: str | None, calibration_hash: str) -> tuple[LayerCheckpoints | None, ResumePoint | None]:
    """(this attempt's LayerCheckpoints, the state it resumes from or None); (None, None) when the run is
    not an attempt of a queued job (`squeeze compress`) or checkpoints are off. The key hashes what makes
    two runs compute the same bytes: spec, model revision, calibration windows, plan, device kind, torch."""
    if attempt is None or not settings.checkpoint_layers:
        return None, None
    identity = {"spec": spec.model_dump(mode="json"), "revision": revision, "calibration": calibration_hash,
                "plan": repr(plan), "device": device.type, "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    store = None
    if settings.checkpoint_s3_uri:
        store = S3CheckpointStore(settings.checkpoint_s3_uri, str(job_id), endpoint_url=settings.s3_endpoint_url)
    checkpoints = LayerCheckpoints(settings.checkpoints_dir / str(job_id), attempt, key, store)
    return checkpoints, checkpoints.take_over()


class LayerCheckpoints:
    """The checkpoints of one attempt of one job; see the module doc."""

    def __init__(self, job_dir: Path, attempt: int, key: str, store: S3CheckpointStore | None = None):
        """store: where committed files are also kept, for workers that share no disk (see
        worker.checkpoint_store); None keeps them on this disk only."""
        self.job_dir = job_dir
        self.attempt = attempt
        self.key = key
        self.folder = job_dir / f"{ATTEMPT_PREFIX}{attempt}"
        self.store = store
        self.meta: dict[str, Any] = {}
        self._layers: dict[int, str] = {}
        self._inputs: str | None = None
        self._stored: set[str] = set()  # files of this attempt already in the store

    def take_over(self) -> ResumePoint | None:
        """Make this attempt's folder, from the newest earlier attempt's when it holds a state with this
        key (returned), on this disk or else in the store; every other attempt's folder is deleted (in
        the store once this attempt holds the state it resumes from)."""
        earlier = sorted(self._attempt_folders(), reverse=True)
        resume = None
        for attempt, folder in earlier:
            if attempt >= self.attempt or resume is not None:
                continue
            state = _read_state(folder)
            if state is not None and state["key"] == self.key:
                os.replace(folder, self.folder)  # the stale worker of `attempt` can no longer write here
                resume = self._resume_point(state)
        for attempt, folder in self._attempt_folders():
            if attempt != self.attempt:
                shutil.rmtree(folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.store is not None:
            if resume is None:
                resume = self._fetch_from_store()
            if resume is not None:
                self._store_state()
            self.store.clear(keep=self.attempt)
        return resume

    def save(self, walk: str, index: int, tensors: dict[str, Tensor], inputs: Activations | None,
             run: dict[str, Any]) -> None:
        """Commit layer `index` of `walk` as finished, with the inputs of the next layer (None after the last).
        Raises LostOwnership when a newer attempt took this attempt's folder over."""
        if not self.folder.is_dir():
            raise LostOwnership(f"attempt {self.attempt}: its layer checkpoints were taken over by a newer attempt")
        layer_file = f"{walk}-layer-{index}.safetensors"
        _save_tensors(self.folder / layer_file, tensors)
        inputs_file = None
        if inputs is not None:
            inputs_file = f"{walk}-inputs-{index + 1}.safetensors"
            _written(self.folder / inputs_file, inputs.write)  # keys hidden.<batch>, one batch in memory at a time
        superseded = {self._layers.get(index), self._inputs} - {layer_file, inputs_file, None}
        self._layers[index] = layer_file
        self._inputs = inputs_file
        state = {"format_version": FORMAT_VERSION, "key": self.key, "walk": walk, "done": index + 1,
                 "layers": {str(i): name for i, name in self._layers.items()}, "inputs": inputs_file,
                 "run": run, "meta": self.meta}
        _write_atomically(self.folder / STATE_NAME, json.dumps(state).encode())
        for name in superseded:
            (self.folder / name).unlink(missing_ok=True)
        if self.store is not None:
            self._store_state(superseded)

    def _current_files(self) -> list[str]:
        return list(self._layers.values()) + ([self._inputs] if self._inputs else [])

    def _store_state(self, superseded: set[str] = frozenset()) -> None:
        """Put the files of the committed state not yet in the store, then state.json, then delete the
        superseded ones. Best effort: a store that fails keeps its last complete state (state.json goes
        last), the run goes on, and the next layer tries again."""
        try:
            for name in self._current_files():
                if name not in self._stored:
                    self.store.put(self.attempt, self.folder / name)
                    self._stored.add(name)
            self.store.put(self.attempt, self.folder / STATE_NAME)
            gone = sorted(superseded & self._stored)
            if gone:
                self.store.delete(self.attempt, gone)
                self._stored -= set(gone)
        except Exception as exc:
            log.warning("attempt %d: layer checkpoint not stored in %s (kept on this disk): %s", self.attempt,
                        self.store.bucket, exc)

    def _fetch_from_store(self) -> ResumePoint | None:
        """The newest earlier attempt's state with this key from the store, downloaded into this folder."""
        for attempt in self.store.attempts():
            if attempt >= self.attempt or not self.store.fetch(attempt, STATE_NAME, self.folder):
                continue
            state = _read_state(self.folder)
            names = [] if state is None else list(state["layers"].values()) + [n for n in [state["inputs"]] if n]
            if (state is not None and state["key"] == self.key
                    and all(self.store.fetch(attempt, name, self.folder) for name in names)):
                return self._resume_point(state)
            for path in self.folder.iterdir():
                path.unlink()
        return None

    def _resume_point(self, state: dict[str, Any]) -> ResumePoint:
        self._layers = {int(i): name for i, name in state["layers"].items()}
        self._inputs = state["inputs"]
        self.meta = dict(state["meta"])
        return ResumePoint(self.folder, state["walk"], state["done"], dict(self._layers), state["inputs"],
                           state["run"], self.meta)

    def _attempt_folders(self) -> list[tuple[int, Path]]:
        if not self.job_dir.is_dir():
            return []
        found = []
        for path in self.job_dir.iterdir():
            suffix = path.name.removeprefix(ATTEMPT_PREFIX)
            if path.name.startswith(ATTEMPT_PREFIX) and suffix.isdigit() and path.is_dir():
                found.append((int(suffix), path))
        return found


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("format_version") == FORMAT_VERSION else None


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    _written(path, lambda tmp: save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp)))


def _written(path: Path, write: Callable[[Path], None]) -> None:
    """write(a temporary path), then renamed to path: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _read_batches(path: Path) -> Iterator[Tensor]:
    with safe_open(str(path), framework="pt") as f:
        for b in range(len(f.keys())):
            yield f.get_tensor(f"hidden.{b}")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- what one layer's modules hold, as tensors and JSON, and back --------------------------------------


def module_tensors(prefix: str, module: nn.Module, report: ModuleReport) -> dict[str, Tensor]:
    """The tensors that rebuild one compressed (and possibly compensated) Linear exactly."""
    linear = module.base if isinstance(module, CompensatedLinear) else module
    tensors = {f"{prefix}.weight": linear.weight}
    if report.quantized is not None:
        q = report.quantized
        tensors |= {f"{prefix}.codes": q.codes, f"{prefix}.scales": q.scales, f"{prefix}.zeros": q.zeros}
    if isinstance(module, CompensatedLinear):
        tensors |= {f"{prefix}.lora_A": module.lora_A, f"{prefix}.lora_B": module.lora_B}
        if module.quantized is not None:
            for side, factor in zip("BA", module.quantized, strict=True):
                tensors |= {f"{prefix}.q{side}.codes": factor.codes, f"{prefix}.q{side}.scales": factor.scales,
                            f"{prefix}.q{side}.zeros": factor.zeros}
    return tensors


def report_record(report: ModuleReport, module: nn.Module) -> dict[str, Any]:
    """A module report as JSON (floats round-trip exactly), without its tensors."""
    record = {f.name: getattr(report, f.name) for f in fields(ModuleReport) if f.name != "quantized"}
    record["shape"] = list(report.shape)
    record["quantized"] = None if report.quantized is None else {"group_size": report.quantized.group_size,
                                                                 "bits": report.quantized.bits}
    adapter_quantized = module.quantized if isinstance(module, CompensatedLinear) else None
    record["adapter_quantized"] = None if adapter_quantized is None else [
        {"group_size": f.group_size, "bits": f.bits} for f in adapter_quantized]
    return record


def restore_module(layer: nn.Module, relative: str, prefix: str, tensors: dict[str, Tensor],
                   record: dict[str, Any]) -> ModuleReport:
    """Put the checkpointed weight (and adapter) into the fresh Linear at `relative`; its report back."""
    linear = layer.get_submodule(relative)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{prefix}: expected a plain Linear to restore into, found {type(linear).__name__}")
    with torch.no_grad():
        linear.weight.copy_(tensors[f"{prefix}.weight"])
    quantized = None
    if record["quantized"] is not None:
        quantized = QuantizedWeight(weight=linear.weight.detach(), codes=tensors[f"{prefix}.codes"],
                                    scales=tensors[f"{prefix}.scales"], zeros=tensors[f"{prefix}.zeros"],
                                    **record["quantized"])
    if f"{prefix}.lora_A" in tensors:
        factors = None
        if record["adapter_quantized"] is not None:
            factors = tuple(
                QuantizedFactor(codes=tensors[f"{prefix}.q{side}.codes"], scales=tensors[f"{prefix}.q{side}.scales"],
                                zeros=tensors[f"{prefix}.q{side}.zeros"], **meta)
                for side, meta in zip("BA", record["adapter_quantized"], strict=True))
        attach_compensation(layer, relative, LowRankAdapter(tensors[f"{prefix}.lora_B"], tensors[f"{prefix}.lora_A"],
                                                            factors))
    values = {k: v for k, v in record.items() if k not in ("quantized", "adapter_quantized")}
    return ModuleReport(**{**values, "shape": tuple(record["shape"]), "quantized": quantized})
