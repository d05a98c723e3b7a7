"""What a job must hold in memory at the least, from the model's config and the job spec, checked
before any weight is read so that a job this worker cannot hold fails at once with the numbers.

These are lower bounds, not predictions of the peak: the worker loads the whole model in fp32 on the
host (peak RSS measured at about 3.3x that on SmolLM2, most of it from loading), keeps the calibration
activations between layers on the host, and puts one decoder layer, one batch of its activations and
the layer's fp64 Gram matrices on the device. A job is refused only when even this minimum does not
fit, so no job that could run is refused; a job that passes may still run out of memory (its worker
then dies, and the job fails after max_attempts with where it was last seen).
"""

from __future__ import annotations

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


def minimum_need(config, num_samples: int, seq_len: int, batch_size: int, on_cpu: bool) -> MemoryNeed:
    """The least this job holds: the fp32 model and the calibration activations on the host; on the
    device one fp32 decoder layer, one batch of activations and the layer's fp64 Grams (at least the
    MLP's input and the down projection's)."""
    params, layer = parameter_counts(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    host = {"model (fp32)": params * FP32, "calibration activations (fp32)": num_samples * seq_len * hidden * FP32}
    device = {"one decoder layer (fp32)": layer * FP32,
              "one batch of activations (fp32)": min(batch_size, num_samples) * seq_len * max(hidden, inter) * FP32,
              "Gram matrices (fp64)": (hidden * hidden + inter * inter) * FP64}
    if on_cpu:
        return MemoryNeed(host={**host, **{f"{k}, on the CPU": v for k, v in device.items()}}, device={})
    return MemoryNeed(host=host, device=device)


def host_available() -> int | None:
    """Bytes this process can still get: MemAvailable, capped by a cgroup v2 limit when one is set."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


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


def check_memory(model_dir: Path, spec, device, batch_size: int = 8) -> None:
    """Refuse (JobFailure), from the model's config alone, a job whose minimum memory does not fit this
    worker; a folder without a readable config is left to load_model's own message."""
    import torch
    from transformers import AutoConfig

    from worker.errors import JobFailure

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        need = minimum_need(config, spec.calibration.num_samples, spec.calibration.seq_len, batch_size,
                            on_cpu=device.type == "cpu")
    except (OSError, ValueError, AttributeError, TypeError):
        return
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    message = refusal(need, host_available(), device_free, str(device))
    if message is not None:
        raise JobFailure(f"model {spec.model.id!r}: {message}")
