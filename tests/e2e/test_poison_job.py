"""A job that kills its worker every time (a poison job) fails after max_attempts with a reason that
says where it died, and does not hold up the queue: a healthy job sent behind it succeeds first.

The fault comes from tests/faults (SIGKILL of the worker's pool child inside decoder layer 2 of a
model whose id contains "poison-model"), not from any hook in production code."""

from __future__ import annotations

import shutil
from datetime import datetime

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.e2e.test_jobs import TERMINAL, spec_for, wait_for
from tests.faults import fault_env
from tests.services import celery_worker


def test_poison_job_fails_after_max_attempts_and_the_job_behind_it_succeeds(tmp_path, tiny_llama_dir, calibration_txt):
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=3, reaper_interval_seconds=0.5,
                        redispatch_after_seconds=30, broker_polling_interval=0.1, max_attempts=3)
    poison_dir = shutil.copytree(tiny_llama_dir, tmp_path / "poison-model")
    log = tmp_path / "worker.log"
    with TestClient(create_app(settings)) as client:
        with celery_worker(settings, log, extra_env=fault_env("kill_at_layer=2,model=poison-model")) as worker:
            poison = client.post("/v1/jobs", json=spec_for(poison_dir, calibration_txt)).json()
            healthy = client.post("/v1/jobs", json=spec_for(tiny_llama_dir, calibration_txt)).json()
            healthy = wait_for(client, healthy["id"], lambda j: j["status"] in TERMINAL)
            poison = wait_for(client, poison["id"], lambda j: j["status"] in TERMINAL, timeout=480)
            assert worker.poll() is None  # only pool children died; the worker itself goes on
        events = client.get(f"/v1/jobs/{poison['id']}/events").json()["items"]

    assert healthy["status"] == "succeeded", healthy
    assert poison["status"] == "failed" and poison["attempt"] == 3, poison
    assert poison["error"] == ("worker lost 3 times (lease expired on each attempt); last seen at layer 1 of 2, "
                               "stage compress; giving up after 3 of 3 attempts")
    # the queue moved on after the first death: the healthy job finished before the poison one ran out
    assert datetime.fromisoformat(healthy["finished_at"]) < datetime.fromisoformat(poison["finished_at"])
    lost = [e for e in events if "worker lost" in e["message"]]
    assert [(e["attempt"], e["stage"], e["data"]) for e in lost] == [
        (attempt, stage, {"stage": "compress", "layer": 1, "layers": 2})
        for attempt, stage in ((1, "queued"), (2, "queued"), (3, "failed"))]
    assert log.read_text().count("exited with 'signal 9 (SIGKILL)'") == 3
    # attempts 2 and 3 resumed from attempt 1's checkpoint of layer 1; the reaper deleted it at the end
    assert sum(e["message"].startswith("resumed at layer 2 of 2") for e in events) == 2
    assert not (settings.checkpoints_dir / poison["id"]).exists()
