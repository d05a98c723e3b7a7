"""What a job must hold in memory at the least, from the model's config and the job spec, checked
before any weight is read so that a job this worker cannot hold fails at once with the numbers.

These are lower bounds, not predictions of the peak. Streamed (Settings.stream_layers, the default;
worker.stream): the host holds one decoder layer twice while it is compressed (original and
compressed weights), the embeddings or the head while they are used, and the calibration
activations between layers (unless Settings.activations puts them on the device or may spill them
to disk: worker.activations); nothing grows with the number of layers. Whole-model (stream_layers
off): the whole model in the compute dtype plus the activations (peak RSS measured at about 3.3x the
fp32 model on SmolLM2, most of it from loading). Either way the device holds one decoder layer, one
batch of its activations and the layer's fp64 Gram matrices. A job is refused only when even this
minimum does not fit, so no job that could run is refused; a job that passes may still run out of
memory (its worker then dies, and the job fails after max_attempts with where it was last seen).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

FP32, FP64 = 4, 8
GiB = 1024**3


@dataclass(frozen=True)
class MemoryNeed:
    host: dict[str, int]  # bytes by part
    device: dict[str, int]  # bytes by part; empty when the device is the CPU (then counted in host)

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())


def parameter_counts(config) -> tuple[int, int]:
    """(whole model, largest decoder layer) parameters of a LLaMA-like decoder from its config."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attention = hidden * head_dim * heads * 2 + hidden * head_dim * kv * 2  # q, o; k, v
    layer = attention + 3 * hidden * inter + 2 * hidden  # + gate, up, down; two norms
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + layers * layer + hidden, layer


def activation_bytes(config, num_samples: int, seq_len: int, dtype_bytes: int = FP32) -> int:
    """The calibration activations between two decoder layers: (num_samples, seq_len, hidden)."""
    return num_samples * seq_len * config.hidden_size * dtype_bytes


def minimum_need(config, num_samples: int, seq_len: int, batch_size: int, on_cpu: bool, streamed: bool = False,
                 dtype_bytes: int = FP32, activations: str = "host") -> MemoryNeed:
    """The least this job holds: on the host the model (whole, or streamed: its largest decoder layer,
    original and compressed, and the embeddings) and the calibration activations, in the compute dtype
    (dtype_bytes per number); on the device one decoder layer, one batch of activations and the layer's
    fp64 Grams (at least the MLP's input and the down projection's). On the CPU both on the host, the
    layer counted once when streamed (the device's layer is the host's). activations (Settings.activations):
    where the activations are counted: "host", "device" (the host on the CPU), or nowhere for "disk" and
    "auto" (which can always spill them to disk)."""
    params, layer = parameter_counts(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    name = {FP32: "fp32", 2: "16-bit"}.get(dtype_bytes, f"{dtype_bytes} bytes")
    held = {f"calibration activations ({name})": activation_bytes(config, num_samples, seq_len, dtype_bytes)}
    on_host = held if activations == "host" or (activations == "device" and on_cpu) else {}
    if streamed:
        host = {f"one decoder layer, original and compressed ({name})": 2 * layer * dtype_bytes,
                f"embeddings ({name})": config.vocab_size * hidden * dtype_bytes, **on_host}
    else:
        host = {f"model ({name})": params * dtype_bytes, **on_host}
    on_device = held if activations == "device" and not on_cpu else {}
    device = {**on_device, f"one decoder layer ({name})": layer * dtype_bytes,
              f"one batch of activations ({name})": min(batch_size, num_samples) * seq_len * max(hidden, inter)
              * dtype_bytes,
              "Gram matrices (fp64)": (hidden * hidden + inter * inter) * FP64}
    if on_cpu:
        if streamed:
            device.pop(f"one decoder layer ({name})")
        return MemoryNeed(host={**host, **{f"{k}, on the CPU": v for k, v in device.items()}}, device={})
    return MemoryNeed(host=host, device=device)


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field ("MemTotal", "MemAvailable") in bytes, or None when unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, current usage) in bytes of this process's cgroup v2, or None when it sets no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit), int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def host_available() -> int | None:
    """Bytes this process can still get: MemAvailable, capped by a cgroup v2 limit when one is set."""
    available = meminfo_bytes("MemAvailable")
    if available is None:
        return None
    cgroup = cgroup_memory()
    return available if cgroup is None else min(available, cgroup[0] - cgroup[1])


def refusal(need: MemoryNeed, host_free: int | None, device_free: int | None, device: str) -> str | None:
    """The message refusing the job, or None when its minimum fits."""
    def parts(by_part: dict[str, int]) -> str:
        return " + ".join(f"{name} {n / GiB:.2f}" for name, n in by_part.items())

    if host_free is not None and need.host_bytes > host_free:
        return (f"this job needs at least {need.host_bytes / GiB:.2f} GiB of host memory ({parts(need.host)} GiB) "
                f"and this worker has {host_free / GiB:.2f} GiB available; use a worker with more memory or a "
                "smaller calibration set")
    if device_free is not None and need.device_bytes > device_free:
        return (f"this job needs at least {need.device_bytes / GiB:.2f} GiB on {device} ({parts(need.device)} GiB) "
                f"and {device_free / GiB:.2f} GiB is free there")
    return None


def check_memory(model_dir: Path, spec, device, batch_size: int = 8, streamed: bool = False,
                 dtype_bytes: int = FP32, activations: str = "host") -> None:
    """Refuse (JobFailure), from the model's config alone, a job whose minimum memory does not fit this
    worker; a folder without a readable config is left to load_model's own message."""
    import torch
    from transformers import AutoConfig

    from worker.errors import JobFailure

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        need = minimum_need(config, spec.calibration.num_samples, spec.calibration.seq_len, batch_size,
                            on_cpu=device.type == "cpu", streamed=streamed, dtype_bytes=dtype_bytes,
                            activations=activations)
    except (OSError, ValueError, AttributeError, TypeError):
        return
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    message = refusal(need, host_available(), device_free, str(device))
    if message is not None:
        raise JobFailure(f"model {spec.model.id!r}: {message}")


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system: glibc's malloc_trim(0), a no-op without glibc.

    glibc keeps freed memory in its heap for reuse, and once a large block has been freed it serves
    blocks up to 32 MB from the heap instead of mapping them, so a streamed job's resident memory
    would creep up layer by layer with memory it no longer uses. Called when a streamed layer or part
    is released (worker.stream), where the freed blocks are the largest; a call costs milliseconds."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not Linux, or a libc without malloc_trim (musl)
        return None
    return libc
