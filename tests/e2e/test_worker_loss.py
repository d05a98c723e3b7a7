"""A worker killed mid-job (SIGKILL: the broker message is lost with it) does not lose the job:
its lease expires, the reaper queues it again and re-sends it, and the next worker finishes it."""

from __future__ import annotations

import os
import signal

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.e2e.test_jobs import TERMINAL, spec_for, wait_for
from tests.services import celery_worker


def test_killed_worker_job_is_requeued_and_finished_by_another(tmp_path, slow_llama_dir, calibration_txt):
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=3, reaper_interval_seconds=0.5,
                        redispatch_after_seconds=30, broker_polling_interval=0.1)
    with TestClient(create_app(settings)) as client:
        spec = spec_for(slow_llama_dir, calibration_txt)
        spec["calibration"].update(num_samples=64, seq_len=128)
        with celery_worker(settings, tmp_path / "worker1.log") as first:
            job = client.post("/v1/jobs", json=spec).json()
            running = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL or (j["progress"]["layer"] or 0) >= 1)
            assert running["status"] == "running" and running["attempt"] == 1, running
            # kill the whole worker at once, main process and pool child, as a lost machine would
            for pid in _children(first.pid) + [first.pid]:
                os.kill(pid, signal.SIGKILL)
        requeued = wait_for(client, job["id"], lambda j: j["status"] != "running", timeout=30)
        assert requeued["status"] == "queued" and requeued["attempt"] == 1, requeued
        with celery_worker(settings, tmp_path / "worker2.log"):
            final = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)
        assert final["status"] == "succeeded" and final["attempt"] == 2, final
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["items"]]
        assert any("lease expired" in m and "requeued" in m for m in messages)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
