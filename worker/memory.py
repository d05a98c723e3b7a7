"""What a job will hold in memory at its peak, on the host and on the compute device, predicted from the
model's config, the job spec and the worker's settings before any weight is read, so that a job this
worker cannot hold fails at once with the numbers (check_memory); the prediction is also recorded in
the job's metrics next to the measured peak (worker.pipeline).

predict_peak walks the job's steps (loading, size-target measurement, compression, evaluation, export,
export check) and counts in each the big tensors the code holds at that step's worst moment, each part
named with its bytes; the peak is the largest step, on the host and on the device separately. The
parts: the interpreter and its libraries (BASELINE_BYTES, measured); the model, whole or streamed (one
decoder layer at a time, the embeddings or the head only while a step uses them: worker.stream); the
calibration activations between layers where Settings.activations keeps them (worker.activations;
"disk" and "auto", which may spill, count nowhere); the layer's fp64 Gram of every input group, again
without sink tokens when sink_tokens > 0, and EoRA's eigenspace of every group (worker.sequential
holds them for the whole layer); the largest Linear's own working set (its copies, GPTQ's or
SparseGPT's d_in^2 fp64 Hessian copies, the error's decomposition); one window's logits; the reference
and reloaded logits of the export check; the adapters a streamed export collects over every layer;
a size target's candidate measurements and, with the model held whole, its whole-model backward pass.
On the CPU the device is the host: its parts are counted once, on the host.

It is a prediction, not a bound: measured peaks on the CPU (docs/benchmarks.md, "Host memory") were
1.18-1.54x it, the rest being allocator and library memory the code does not hold as tensors (and,
streamed, about 9 MB a layer that no kept tensor explains); on CUDA the host also holds the CUDA
libraries, not counted. A job is refused when its predicted peak does not
fit what the worker has, so a job a little over may still run out of memory (its worker then dies,
and the job fails after max_attempts with where it was last seen).

minimum_need is an older, smaller count (a lower bound of the same job) that worker.activations sizes
the activations' placement against and app.jobs.routing routes memory classes by.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

FP32, FP64 = 4, 8
GiB = 1024**3
# Resident memory of a fresh process that has imported what a job imports and loaded a tokenizer (CPU,
# torch 2.13, transformers 5.25, one run of 502,056 kB; 0.32 GB of it before compressed_tensors and peft):
#   .venv/bin/python -c "import torch, transformers, worker.pipeline, worker.sequential, worker.evaluate,
#   worker.export, worker.stream, worker.job_data, app.cli, compressed_tensors, peft; from pathlib import Path;
#   from worker.models import load_tokenizer; load_tokenizer(Path('bench/.data/smollm2-135m'));
#   x = torch.randn(512, 512); torch.linalg.eigh((x @ x.T).double());
#   print([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')])"
BASELINE_BYTES = 502_056 * 1024
GPTQ_HESSIAN_COPIES = 5  # fp64 d_in^2 at once: prepared, damped, its Cholesky, their inverse, its Cholesky
VERIFY_WINDOWS, VERIFY_LEN = 2, 128  # the export check's windows (worker.pipeline)


@dataclass(frozen=True)
class MemoryNeed:
    host: dict[str, int]  # bytes by part
    device: dict[str, int]  # bytes by part; empty when the device is the CPU (then counted in host)
    host_step: str = ""  # predict_peak: the job step the host's peak is in
    device_step: str = ""

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


def linear_shapes(config) -> list[tuple[int, int]]:
    """(d_out, d_in) of one LLaMA-like decoder layer's Linears: q, k, v, o, gate, up, down."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    attention = heads * head_dim
    return [(attention, hidden), (kv, hidden), (kv, hidden), (hidden, attention), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def gram_widths(config) -> list[int]:
    """d_in of each input group's Gram (q/k/v, o, gate/up, down)."""
    shapes = linear_shapes(config)
    return [shapes[0][1], shapes[3][1], shapes[4][1], shapes[6][1]]


def predict_peak(config, spec, *, on_cpu: bool, streamed: bool, dtype_bytes: int = FP32, activations: str = "host",
                 batch_size: int = 8) -> MemoryNeed:
    """The job's predicted peak (see the module doc): the parts of its largest step on the host, and of its
    largest step on the device (none on the CPU). spec: the JobSpec; activations: Settings.activations or
    the placement taken."""
    steps = job_steps(config, spec, on_cpu=on_cpu, streamed=streamed, dtype_bytes=dtype_bytes,
                      activations=activations, batch_size=batch_size)
    host_step = max(steps, key=lambda step: sum(steps[step][0].values()))
    device_step = max(steps, key=lambda step: sum(steps[step][1].values()))
    if on_cpu:
        return MemoryNeed(host=steps[host_step][0], device={}, host_step=host_step)
    return MemoryNeed(host=steps[host_step][0], device=steps[device_step][1], host_step=host_step,
                      device_step=device_step)


def job_steps(config, spec, *, on_cpu: bool, streamed: bool, dtype_bytes: int, activations: str,
              batch_size: int) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """(host parts, device parts) at the worst moment of each step of the job, in bytes."""
    d, vocab, hidden = dtype_bytes, config.vocab_size, config.hidden_size
    name = {FP32: "fp32", 2: "16-bit"}.get(d, f"{d} bytes")
    params, layer_params = parameter_counts(config)
    shapes = linear_shapes(config)
    linear_params = config.num_hidden_layers * sum(o * n for o, n in shapes)
    cal, ev = spec.calibration, spec.evaluation
    windows = min(batch_size, cal.num_samples)  # one batch
    quant = spec.quantization.method if spec.quantization else None
    sweeps = quant == "gptq" or (spec.sparsity is not None and spec.sparsity.method == "sparsegpt")
    comp = spec.compensation if spec.compensation and spec.compensation.method != "none" else None
    target = spec.target is not None and spec.target.bits_per_weight is not None
    bits = (spec.quantization.bits or 4) if quant else None

    base = {"interpreter and libraries (measured)": BASELINE_BYTES}
    if not streamed:
        base[f"model ({name})"] = params * d
    layer = {} if on_cpu and not streamed else {f"one decoder layer ({name})": layer_params * d}
    head = {} if on_cpu and not streamed else {f"lm_head ({name})": vocab * hidden * d}

    def read(parts: dict) -> dict:
        """What a streamed job reads on the host before it moves to the device."""
        return {f"{part}, read on the host": n for part, n in parts.items()} if streamed else {}

    def held(num_windows: int, seq_len: int, what: str) -> tuple[dict, dict]:
        """The activations between layers: (on the host, on the device) as placed; nowhere when they may spill."""
        part = {f"{what} activations ({name})": num_windows * seq_len * hidden * d}
        where = "host" if activations == "device" and on_cpu else activations
        return (part if where == "host" else {}), (part if where == "device" else {})

    def place(host: dict, work: dict, read: dict | None = None) -> tuple[dict, dict]:
        """host: held there; work: the compute device's working set (the host's on the CPU); read: what
        the host reads before it moves to the device (on the CPU the working set's own tensors)."""
        return ({**host, **work}, {}) if on_cpu else ({**host, **(read or {})}, work)

    grams = {"Gram matrices of every input group (fp64)": sum(n * n for n in gram_widths(config)) * FP64}
    if comp is not None and comp.sink_tokens:
        grams["the same without sink tokens (fp64)"] = grams["Gram matrices of every input group (fp64)"]
    if comp is not None and comp.method == "eora":
        grams["EoRA eigenspaces of every input group (fp64)"] = sum(n * n for n in gram_widths(config)) * FP64
    forward = windows * cal.seq_len * ((2 * hidden + 3 * config.intermediate_size) * d
                                       + max(gram_widths(config)) * FP64)  # + the hooked input in fp64

    def decomposition(o: int, n: int) -> int:
        """The error's fp64 decomposition: projected error, U, Vh and EoRA's back-projection (n, n)."""
        k = min(o, n)
        return (o * n + o * k + k * n + (n * n if comp.method == "eora" else 0)) * FP64 if comp else 0

    def compress_work(o: int, n: int) -> int:  # copies: the original, the compressed weight, the fp32 residual
        sweep = GPTQ_HESSIAN_COPIES * n * n * FP64 + o * n * FP32 if sweeps else 0
        return o * n * (2 * d + FP32) + max(sweep, decomposition(o, n))

    def measure_work(o: int, n: int) -> int:  # worker.candidates: an RTN candidate, its residual fp32 and fp64
        return o * n * (2 * d + FP32 + FP64) + decomposition(o, n)

    steps = {}
    cal_host, cal_device = held(cal.num_samples, cal.seq_len, "calibration")
    largest = max(shapes, key=lambda s: compress_work(*s))
    work = {**cal_device, **layer, **grams,
            f"largest Linear {largest[0]}x{largest[1]}: its copies and compression": max(compress_work(*largest),
                                                                                          forward)}
    host = {**base, **cal_host}
    if comp is not None and comp.rank_budget is not None and not streamed:
        host[f"walk-1 residuals of every Linear ({name})"] = linear_params * d
    steps["compression"] = place(host, work, read(layer))
    if target:
        largest = max(shapes, key=lambda s: measure_work(*s))
        steps["size-target measurement"] = place({**base, **cal_host}, {
            **cal_device, **layer, **grams,
            f"candidate measurement of Linear {largest[0]}x{largest[1]}": max(measure_work(*largest), forward)},
            read(layer))
        if not streamed:  # worker.target.output_sensitivity: one backward pass per batch through the model
            saved = 7 * hidden + 3 * shapes[1][0] + 4 * config.intermediate_size  # per token and layer, LLaMA
            steps["size-target sensitivity"] = ({
                **base, f"activations saved for the backward pass ({name})":
                    config.num_hidden_layers * windows * cal.seq_len * saved * d,
                "logits, log-softmax and gradient (fp32)": 3 * windows * cal.seq_len * vocab * FP32}, {})

    eval_len = ev.seq_len or cal.seq_len  # the head's turn, after the walk through the layers
    ev_host, ev_device = held(ev.num_windows, eval_len, "evaluation")
    steps["evaluation"] = place({**base, **ev_host}, {**ev_device, **head, "one window's logits and log-softmax "
                                                      "(fp32)": 2 * eval_len * vocab * FP32}, read(head))
    verify = min(VERIFY_WINDOWS, cal.num_samples) * min(VERIFY_LEN, cal.seq_len) * vocab
    reference = {f"reference logits ({name})": verify * d}
    written = (params - linear_params) * d + (linear_params * bits // 8 if quant else linear_params * d)
    if streamed:
        adapters = 0
        if comp is not None:  # fp16 factors of every Linear, held until the adapter file is written
            if target:
                adapters = int(spec.target.bits_per_weight * linear_params / 8)  # its whole budget at most
            elif comp.rank_budget is not None:
                adapters = 2 * (comp.rank_budget.params or int(comp.rank_budget.fraction * linear_params))
            else:
                adapters = 2 * comp.rank * config.num_hidden_layers * sum(o + n for o, n in shapes)
        # The export materialises each layer on the host; its check runs the reloaded layers on the device.
        steps["export"] = ({**base, **reference, "adapters of every layer (fp16)": adapters, **layer}, {})
        steps["export check"] = place({**base, **reference, "logits of the check, gathered (fp32)": verify * FP32},
                                      {**head, "logits of the check (fp32)": verify * FP32}, read(head))
    else:
        steps["export"] = ({**base, **reference, "checkpoint serialised for writing": written}, {})
        steps["export check"] = ({**base, **reference, f"the export reloaded ({name})": params * d,
                                  "its checkpoint read while loading": written,
                                  "logits of the check, twice (fp32)": 2 * verify * FP32}, {})
        file_bytes = _dtype_bytes(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None), d)
        steps["loading"] = ({**base, "checkpoint read while loading": params * file_bytes}, {})
    return steps


def _dtype_bytes(dtype, default: int) -> int:
    """Bytes per number of a config's dtype ("float32", "bfloat16", a torch dtype), else default."""
    text = str(dtype).removeprefix("torch.")
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(text, default)


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
    """The message refusing the job, or None when its predicted peak fits."""
    def parts(by_part: dict[str, int]) -> str:
        return " + ".join(f"{name} {n / GiB:.2f}" for name, n in by_part.items())

    def during(step: str) -> str:
        return f" during {step}" if step else ""

    if host_free is not None and need.host_bytes > host_free:
        return (f"this job is predicted to need {need.host_bytes / GiB:.2f} GiB of host memory at its peak"
                f"{during(need.host_step)} ({parts(need.host)} GiB) and this worker has {host_free / GiB:.2f} GiB "
                "available; use a worker with more memory or a smaller calibration set")
    if device_free is not None and need.device_bytes > device_free:
        return (f"this job is predicted to need {need.device_bytes / GiB:.2f} GiB on {device} at its peak"
                f"{during(need.device_step)} ({parts(need.device)} GiB) and {device_free / GiB:.2f} GiB is free "
                "there")
    return None


def check_memory(model_dir: Path, spec, device, batch_size: int = 8, streamed: bool = False,
                 dtype_bytes: int = FP32, activations: str = "host") -> None:
    """Refuse (JobFailure), from the model's config alone, a job whose predicted peak does not fit this
    worker; a folder without a readable config is left to load_model's own message."""
    import torch
    from transformers import AutoConfig

    from worker.errors import JobFailure

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        need = predict_peak(config, spec, on_cpu=device.type == "cpu", streamed=streamed, dtype_bytes=dtype_bytes,
                            activations=activations, batch_size=batch_size)
    except (OSError, ValueError, AttributeError, TypeError):
        return
    device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    message = refusal(need, host_available(), device_free, str(device))
    if message is not None:
        raise JobFailure(f"model {spec.model.id!r}: {message}")


def prediction_record(need: MemoryNeed) -> dict:
    """The prediction as the job's metrics keep it (metrics.memory.predicted)."""
    return {"host_bytes": need.host_bytes, "host_step": need.host_step, "host_parts": need.host,
            "device_bytes": need.device_bytes, "device_step": need.device_step, "device_parts": need.device}


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
