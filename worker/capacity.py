"""The device memory a worker advertises, for routing jobs by memory class (app/jobs/routing.py).

Measured before the worker's pool starts, in a child process: asking CUDA in the worker's main process
would initialise it there, and the pool's forked children could then not use it.
"""

from __future__ import annotations

import subprocess
import sys

from app.settings import Settings
from worker.memory import GiB, cgroup_memory, meminfo_bytes

# Prints the total memory of the device the pipeline would pick (worker.pipeline.pick_device), or -1 for the CPU.
_PROBE = """
import sys, torch
setting = sys.argv[1]
if setting == "auto":
    setting = "cuda" if torch.cuda.is_available() else "cpu"
device = torch.device(setting)
print(torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else -1)
"""


def host_total() -> int | None:
    """MemTotal, capped by a cgroup v2 limit when one is set."""
    total = meminfo_bytes("MemTotal")
    if total is None:
        return None
    cgroup = cgroup_memory()
    return total if cgroup is None else min(total, cgroup[0])


def advertised_memory(settings: Settings) -> tuple[int | None, str]:
    """(bytes, where they come from): SQUEEZE_WORKER_MEMORY_GIB when set, else the CUDA device's total
    memory, else (a CPU worker) the host's. None when it cannot be measured."""
    if settings.worker_memory_gib is not None:
        return int(settings.worker_memory_gib * GiB), "set by SQUEEZE_WORKER_MEMORY_GIB"
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, settings.device], capture_output=True, text=True,
                               timeout=120, check=True)
        device_bytes = int(probe.stdout.split()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None, "device memory could not be measured"
    if device_bytes >= 0:
        return device_bytes, f"total memory of CUDA device {settings.device!r}"
    return host_total(), "host memory of a CPU worker"
