"""Routing by memory class (app/jobs/routing.py): which class a job gets, what each queue is called, and
which queues a worker consumes. No broker here: tests/integration/test_routing.py sends to Redis."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.jobs.routing import ANY, choose_class, class_name, queue_for, route_job, worker_classes, worker_queues
from app.jobs.spec import JobSpec
from app.main import create_app
from app.settings import Settings
from worker.memory import GiB

CLASSES = [24.0, 48.0, 80.0]
# LLaMA-3-70B's shape: one layer, its activations and its Grams need about 11.6 GiB on the device
LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}
TINY = {**LLAMA_70B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256}


def spec_for(model: str, **calibration) -> JobSpec:
    return JobSpec.model_validate({"model": {"id": model}, "quantization": {"method": "rtn", "bits": 4},
                                   "calibration": {"dataset": "org/data", **calibration}})


def model_folder(tmp_path, config: dict, name: str = "model") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("need_gib,expected", [
    (0.001, "24gib"), (24.0, "24gib"), (24.01, "48gib"), (79.9, "80gib"),
    (200.0, "80gib"),  # above every class: the largest, whose workers may have more
])
def test_a_job_gets_the_smallest_class_that_holds_it(need_gib, expected):
    assert choose_class(CLASSES, int(need_gib * GiB)) == expected


def test_class_and_queue_names():
    settings = Settings(queue_name="sq", memory_classes_gib=[80, 0.5, 24, 24])
    assert settings.memory_classes_gib == [0.5, 24.0, 80.0]  # sorted, once each
    assert [class_name(g) for g in settings.memory_classes_gib] == ["0.5gib", "24gib", "80gib"]
    assert queue_for(settings, "24gib") == "sq.24gib"
    assert queue_for(settings, ANY) == "sq"


@pytest.mark.parametrize("bad", [[0], [-8, 24]])
def test_a_class_must_be_a_positive_size(bad):
    with pytest.raises(ValidationError):
        Settings(memory_classes_gib=bad)


@pytest.mark.parametrize("memory_gib,queues", [
    (80.0, ["squeeze", "squeeze.24gib", "squeeze.48gib", "squeeze.80gib"]),  # an H100: every class
    (79.1, ["squeeze", "squeeze.24gib", "squeeze.48gib"]),  # an 80 GB card reports a little under 80 GiB
    (16.0, ["squeeze"]),  # below every class: only jobs of class "any"
    (None, ["squeeze"]),  # not measured
])
def test_a_worker_consumes_the_base_queue_and_every_class_it_holds(memory_gib, queues):
    settings = Settings(memory_classes_gib=CLASSES)
    memory = int(memory_gib * GiB) if memory_gib is not None else None
    assert worker_queues(settings, memory) == queues


def test_worker_classes_are_those_not_above_its_memory():
    assert worker_classes(CLASSES, 48 * GiB) == ["24gib", "48gib"]
    assert worker_classes(CLASSES, 48 * GiB - 1) == ["24gib"]


def test_a_local_model_is_routed_from_its_config(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=[1, 16, 80])
    route = route_job(settings, spec_for(model_folder(tmp_path, LLAMA_70B), num_samples=128, seq_len=2048))
    assert route.memory_class == "16gib" and route.queue == "squeeze.16gib"
    # one fp32 layer (855.6M parameters) + 8 windows x 2048 x 28672 fp32 + fp64 Grams of 8192 and 28672
    layer = 8192 * 128 * 64 * 2 + 8192 * 128 * 8 * 2 + 3 * 8192 * 28672 + 2 * 8192
    expected = layer * 4 + 8 * 2048 * 28672 * 4 + (8192**2 + 28672**2) * 8
    assert route.need_bytes == expected
    assert 11 * GiB < expected < 12 * GiB
    assert route.data == {"memory_class": "16gib", "queue": "squeeze.16gib", "device_need_bytes": expected}
    assert "needs at least 11." in route.note

    tiny = route_job(settings, spec_for(model_folder(tmp_path, TINY, "tiny")))
    assert (tiny.memory_class, tiny.queue) == ("1gib", "squeeze.1gib")


def test_a_job_above_every_class_goes_to_the_largest_and_says_so(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=[1, 4])
    route = route_job(settings, spec_for(model_folder(tmp_path, LLAMA_70B)))
    assert route.memory_class == "4gib"
    assert "more than every class" in route.note


def test_without_classes_every_job_goes_to_the_base_queue(tmp_path):
    route = route_job(Settings(data_dir=tmp_path / "data"), spec_for(model_folder(tmp_path, LLAMA_70B)))
    assert (route.memory_class, route.queue, route.need_bytes, route.note) == (ANY, "squeeze", None, "")


@pytest.mark.parametrize("write,reason", [
    (None, "no readable config.json"),
    ("{not json", "not JSON"),
    (json.dumps({"model_type": "llama"}), "lacks what the memory prediction needs"),
])
def test_a_config_that_cannot_be_read_routes_to_any_worker_with_the_reason(tmp_path, write, reason):
    folder = tmp_path / "model"
    folder.mkdir()
    if write is not None:
        (folder / "config.json").write_text(write)
    route = route_job(Settings(data_dir=tmp_path / "data", memory_classes_gib=CLASSES), spec_for(str(folder)))
    assert (route.memory_class, route.queue, route.need_bytes) == (ANY, "squeeze", None)
    assert reason in route.note and "any worker" in route.note


def test_a_local_folder_outside_the_allowed_roots_is_never_read(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=CLASSES, allow_local_paths=False)
    route = route_job(settings, spec_for(model_folder(tmp_path, LLAMA_70B)))
    assert route.memory_class == ANY and "not allowed" in route.note


def test_a_hub_that_does_not_answer_delays_the_submit_by_the_timeout_only(tmp_path):
    with socket.socket() as silent:  # accepts TCP connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=CLASSES, hub_config_timeout_seconds=0.5,
                            hf_endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        route = route_job(settings, spec_for("org/model"))
        elapsed = time.monotonic() - started
    assert route.memory_class == ANY
    assert "Hub" in route.note
    assert elapsed < 3


def test_the_api_shows_the_class_and_the_first_event_says_why(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=[1, 16])
    with TestClient(create_app(settings, run_reaper=False)) as client:
        job = client.post("/v1/jobs", json=spec_for(model_folder(tmp_path, LLAMA_70B)).model_dump(mode="json")).json()
        assert job["memory_class"] == "16gib"
        event = client.get(f"/v1/jobs/{job['id']}/events").json()["items"][0]
        assert event["stage"] == "queued" and "memory class 16gib" in event["message"]
        assert event["data"]["queue"] == "squeeze.16gib"
        listed = client.get("/v1/jobs").json()["items"][0]
        assert listed["memory_class"] == "16gib"
    # the wake-up message went to the class's queue of the filesystem broker (<stamp>_<id>.<queue>.msg)
    assert [p.name.partition(".")[2] for p in (settings.broker_dir / "in").glob("*.msg")] == ["squeeze.16gib.msg"]


def test_squeeze_worker_listens_on_the_queues_of_its_advertised_memory():
    from app.cli import _worker_argv, worker_queues

    settings = Settings(memory_classes_gib=[1, 16, 80], worker_memory_gib=20)
    queues = worker_queues(settings)
    assert queues == ["squeeze", "squeeze.1gib", "squeeze.16gib"]
    argv = _worker_argv(settings, "INFO", queues)
    assert argv[argv.index("-Q") + 1] == "squeeze,squeeze.1gib,squeeze.16gib"
    assert worker_queues(Settings(worker_memory_gib=20)) == ["squeeze"]  # no classes: the one queue


def test_when_every_hub_lookup_is_busy_a_submit_does_not_wait(tmp_path, monkeypatch):
    import threading

    from app.jobs import routing

    monkeypatch.setattr(routing, "_hub_slots", threading.BoundedSemaphore(1))
    routing._hub_slots.acquire()  # the one slot is taken by a look-up still waiting on the Hub
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=CLASSES, hub_config_timeout_seconds=30,
                        hf_endpoint="http://127.0.0.1:9")
    started = time.monotonic()
    route = route_job(settings, spec_for("org/model"))
    assert route.memory_class == ANY and "already waiting" in route.note
    assert time.monotonic() - started < 5
