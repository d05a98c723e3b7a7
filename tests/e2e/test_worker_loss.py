"""A worker killed mid-job (SIGKILL of the whole worker: the broker message is lost with it) does not
lose the job or its work: the lease expires, the reaper queues the job again and re-sends it, and the
next worker resumes from the last finished layer, producing the same artifact bytes as an undisturbed
run. In both modes: PostgreSQL + Redis, and SQLite + the filesystem broker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from app.jobs.destinations import OWNER_MARKER
from app.main import create_app
from app.settings import Settings
from tests.e2e.test_jobs import TERMINAL, spec_for, wait_for
from tests.services import REDIS_URL, artifact_dir, bearer, celery_worker, create_api_key, fresh_postgres_database

KILL_AFTER_LAYER = 4  # of the slow model's 12


@pytest.fixture(params=["distributed", "embedded"])
def mode_settings(request, tmp_path):
    short = {"lease_seconds": 3, "reaper_interval_seconds": 0.5, "redispatch_after_seconds": 30,
             "broker_polling_interval": 0.1, "local_roots": [tmp_path.parent.parent]}
    if request.param == "distributed":
        with fresh_postgres_database() as url:
            settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                                queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}", **short)
            from app.db.session import upgrade_database

            upgrade_database(settings)
            yield settings
    else:
        yield Settings(data_dir=tmp_path / "data", **short)


def test_killed_worker_job_resumes_from_its_last_layer_with_identical_artifacts(
        mode_settings, tmp_path, slow_llama_dir, calibration_txt):
    settings = mode_settings
    spec = spec_for(slow_llama_dir, calibration_txt, compensation={"method": "eora", "rank": 8})
    spec["quantization"] = {"method": "gptq", "bits": 4, "group_size": 32}
    spec["calibration"].update(num_samples=16, seq_len=64)
    with TestClient(create_app(settings)) as client:
        if settings.auth_enabled:
            client.headers.update(bearer(create_api_key(settings)))
        with celery_worker(settings, tmp_path / "worker1.log") as first:
            job = client.post("/v1/jobs", json=spec).json()
            running = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL
                               or (j["progress"]["layer"] or 0) >= KILL_AFTER_LAYER)
            assert running["status"] == "running" and running["attempt"] == 1, running
            # kill the whole worker at once, main process and pool child, as a lost machine would
            for pid in _children(first.pid) + [first.pid]:
                os.kill(pid, signal.SIGKILL)
            killed_after, killed_at = running["progress"]["layer"], time.monotonic()
        requeued = wait_for(client, job["id"], lambda j: j["status"] != "running", timeout=30)
        requeued_at = time.monotonic()
        assert requeued["status"] == "queued" and requeued["attempt"] == 1, requeued
        assert (settings.checkpoints_dir / job["id"]).is_dir()  # kept for the next attempt
        with celery_worker(settings, tmp_path / "worker2.log"):
            started_at = time.monotonic()
            wait_for(client, job["id"], lambda j: j["status"] in TERMINAL
                     or (j["attempt"] == 2 and (j["progress"]["layer"] or 0) > killed_after))
            progressing_at = time.monotonic()
            resumed = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)
            print(f"{settings.embedded and 'embedded' or 'distributed'}: killed after layer {killed_after}; requeued "
                  f"{requeued_at - killed_at:.1f} s later (lease {settings.lease_seconds:g} s); a new worker past "
                  f"that layer {progressing_at - started_at:.1f} s after it started")
            undisturbed = client.post("/v1/jobs", json=spec).json()
            undisturbed = wait_for(client, undisturbed["id"], lambda j: j["status"] in TERMINAL)
        assert resumed["status"] == "succeeded" and resumed["attempt"] == 2, resumed
        assert undisturbed["status"] == "succeeded" and undisturbed["attempt"] == 1, undisturbed
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["items"]]
        assert any("lease expired" in m and "requeued" in m for m in messages)
        resumed_at = [m for m in messages if m.startswith("resumed at layer")]
        assert len(resumed_at) == 1, messages
        layer = int(resumed_at[0].split()[3])
        assert KILL_AFTER_LAYER < layer <= 12 and layer >= killed_after + 1, resumed_at
        assert "(attempt 2)" in resumed_at[0]
        for finished in (resumed, undisturbed):  # the job ended: its checkpoints are gone
            assert not (settings.checkpoints_dir / finished["id"]).exists()
        assert resumed["metrics"]["perplexity_after"] == undisturbed["metrics"]["perplexity_after"]
        assert _artifact_digest(settings, resumed) == _artifact_digest(settings, undisturbed)


def _artifact_digest(settings, job: dict) -> dict[str, str]:
    """sha256 of every artifact file, squeeze.json without its creation time (the local destination's
    owner marker names the job, so it is left out)."""
    folder = artifact_dir(settings, job)
    digest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != OWNER_MARKER):
        data = path.read_bytes()
        if path.name == "squeeze.json":
            manifest = json.loads(data)
            manifest.pop("created_at")
            data = json.dumps(manifest, sort_keys=True).encode()
        digest[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    assert "squeeze.json" in digest and any(name.endswith(".safetensors") for name in digest)
    return digest


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
