"""Which queue a job goes to: routing by memory class.

With `memory_classes_gib` set (say [24, 48, 80]), each class has a queue `<queue_name>.<class>` (e.g.
`squeeze.48gib`). At submit the model's config.json is read when that needs no weights (a local folder,
or the one file from the Hub), worker.memory predicts the least device memory the job needs, and the job
goes to the smallest class that holds it (the largest class when none does: a worker there may have more
than its class, and its own memory check refuses the job with the numbers otherwise). A worker consumes
the base queue and the queue of every class not above its device memory (GPU memory, or host memory on
a CPU worker). A job whose config cannot be read, or every job when no classes are set, goes to the
base queue, memory class "any", which every worker consumes.

Imports no torch: the API process uses it.
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.jobs.service import HUB_ID, UPLOAD_PREFIX, looks_local
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.memory import GiB, minimum_need

ANY = "any"
MAX_CONFIG_BYTES = 4 * 1024**2  # a config.json is a few KiB; a bigger file is not read
BATCH_SIZE = 8  # the pipeline's batch of calibration windows (worker.memory.check_memory's default)


@dataclass(frozen=True)
class Route:
    memory_class: str  # ANY or a class name such as "48gib"
    queue: str
    need_bytes: int | None = None  # the predicted least device memory, when the config was read
    note: str = ""  # why this queue, for the job's first event
    data: dict[str, Any] = field(default_factory=dict)


class ConfigUnavailable(Exception):
    """The model's config could not be read without downloading weights; the message says why."""


def class_name(gib: float) -> str:
    return f"{gib:g}gib"


def queue_for(settings: Settings, memory_class: str) -> str:
    return settings.queue_name if memory_class == ANY else f"{settings.queue_name}.{memory_class}"


def choose_class(classes_gib: list[float], need_bytes: int) -> str:
    """The smallest class that holds need_bytes, else the largest one."""
    ordered = sorted(classes_gib)
    for gib in ordered:
        if need_bytes <= gib * GiB:
            return class_name(gib)
    return class_name(ordered[-1])


def worker_classes(classes_gib: list[float], memory_bytes: int) -> list[str]:
    """The classes a worker with memory_bytes serves: every one not above its memory."""
    return [class_name(gib) for gib in sorted(classes_gib) if gib * GiB <= memory_bytes]


def worker_queues(settings: Settings, memory_bytes: int | None) -> list[str]:
    """The base queue (class "any"), then one queue per class the worker holds (none when memory is unknown)."""
    classes = worker_classes(settings.memory_classes_gib, memory_bytes) if memory_bytes is not None else []
    return [settings.queue_name] + [queue_for(settings, c) for c in classes]


def device_need(config: dict[str, Any], spec: JobSpec) -> int:
    """worker.memory's least device memory for this job, from a config.json's fields."""
    try:
        need = minimum_need(SimpleNamespace(**config), spec.calibration.num_samples, spec.calibration.seq_len,
                            BATCH_SIZE, on_cpu=False)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigUnavailable(f"its config.json lacks what the memory prediction needs ({exc})") from None
    return need.device_bytes


def _parse(raw: bytes | str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except ValueError:
        raise ConfigUnavailable("its config.json is not JSON") from None
    if not isinstance(config, dict):
        raise ConfigUnavailable("its config.json is not a JSON object")
    return config


def _local_config(settings: Settings, ref: str) -> dict[str, Any]:
    path = Path(ref.removeprefix("file://")).expanduser().resolve()
    if not settings.local_path_permitted(path):  # refused at validation anyway; never read it
        raise ConfigUnavailable("local model paths are not allowed on this server")
    file = path / "config.json"
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigUnavailable("its config.json is too large to be a model config")
        return _parse(file.read_bytes())
    except OSError:
        raise ConfigUnavailable("no readable config.json in the model folder") from None


# Hub look-ups run in these threads so that a submit waits at most hub_config_timeout_seconds: huggingface_hub
# retries an unreachable Hub for about 25 s, and a look-up that outlives its wait finishes in the background.
# At most HUB_LOOKUPS run at once; past that a submit does not wait at all (a Hub that is down must not
# pile up threads).
HUB_LOOKUPS = 4
_hub_pool = ThreadPoolExecutor(max_workers=HUB_LOOKUPS, thread_name_prefix="squeeze-hub-config")
_hub_slots = threading.BoundedSemaphore(HUB_LOOKUPS)


def _hub_config(settings: Settings, spec: JobSpec) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    token = spec.hf_token or settings.hf_token
    fetch = functools.partial(
        hf_hub_download, spec.model.id, "config.json", revision=spec.model.revision,
        token=token.get_secret_value() if token else None, cache_dir=settings.data_dir / "hub",
        endpoint=settings.hf_endpoint, etag_timeout=settings.hub_config_timeout_seconds)
    try:  # a config already in the cache (an earlier job's, embedded mode's worker shares it) needs no Hub
        return _parse(Path(fetch(local_files_only=True)).read_bytes())
    except Exception:  # noqa: S110 - not cached (or unreadable there): ask the Hub
        pass
    if not _hub_slots.acquire(blocking=False):
        raise ConfigUnavailable(f"{HUB_LOOKUPS} Hub look-ups are already waiting for an answer")
    future = _hub_pool.submit(fetch)
    future.add_done_callback(lambda _: _hub_slots.release())
    try:
        path = future.result(timeout=settings.hub_config_timeout_seconds)
    except FutureTimeout:
        raise ConfigUnavailable(f"the Hub did not answer within {settings.hub_config_timeout_seconds:g} s") from None
    except Exception as exc:  # not found, gated, unreachable: the worker's download says which, in detail
        raise ConfigUnavailable(f"its config.json could not be fetched from the Hub ({exc.__class__.__name__})") \
            from None
    return _parse(Path(path).read_bytes())


def model_config(settings: Settings, spec: JobSpec) -> dict[str, Any]:
    ref = spec.model.id
    if looks_local(ref):
        return _local_config(settings, ref)
    if ref.startswith(UPLOAD_PREFIX) or not HUB_ID.match(ref):
        raise ConfigUnavailable("it is neither a local folder nor a Hub id")
    return _hub_config(settings, spec)


def route_job(settings: Settings, spec: JobSpec) -> Route:
    """The job's memory class and queue. Reads the model's config (from the Hub too, within
    hub_config_timeout_seconds): call it outside any database transaction."""
    any_route = Route(ANY, queue_for(settings, ANY))
    if not settings.memory_classes_gib:
        return any_route
    try:
        need = device_need(model_config(settings, spec), spec)
    except ConfigUnavailable as exc:
        return Route(ANY, any_route.queue, note=f"memory class any (any worker): the model's config was not read: {exc}",
                     data={"memory_class": ANY, "queue": any_route.queue})
    memory_class = choose_class(settings.memory_classes_gib, need)
    queue = queue_for(settings, memory_class)
    above_all = need > max(settings.memory_classes_gib) * GiB
    note = (f"memory class {memory_class}: needs at least {need / GiB:.2f} GiB of device memory"
            + (" (more than every class: the largest was chosen)" if above_all else ""))
    return Route(memory_class, queue, need, note,
                 data={"memory_class": memory_class, "queue": queue, "device_need_bytes": need})
