"""Broker and database outages, in distributed mode (PostgreSQL + Redis + a real `squeeze worker`).

The local Redis and PostgreSQL are really stopped and started again, for a few seconds each. Each test
prints how long recovery took, from the service being back to the job moving again and to its end;
the assertions are on outcomes only (this machine is noisy), except the bound on a submit while the
broker is down.
"""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from app.db.session import upgrade_database
from app.main import create_app
from app.settings import Settings
from tests.e2e.test_jobs import TERMINAL, spec_for, wait_for
from tests.services import (
    REDIS_URL,
    bearer,
    celery_worker,
    create_api_key,
    fresh_postgres_database,
    local_servers_controllable,
    postgres_stopped,
    redis_stopped,
)

pytestmark = pytest.mark.skipif(not local_servers_controllable(),
                                reason="needs the local Redis and PostgreSQL cluster, to stop and start them")

OUTAGE_SECONDS = 3.0  # long enough that the worker's writes meet it; short, for the others using the servers


@pytest.fixture
def settings(tmp_path):
    with fresh_postgres_database() as url:
        # A lease well above the outage: the job must survive it without a requeue (attempt stays 1).
        settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                            queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}", lease_seconds=12,
                            reaper_interval_seconds=0.5, redispatch_after_seconds=30, broker_polling_interval=0.1,
                            local_roots=[tmp_path.parent.parent])
        upgrade_database(settings)
        yield settings


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        client.headers.update(bearer(create_api_key(settings)))
        yield client


def slow_spec(slow_llama_dir, calibration_txt) -> dict:
    """The 12-layer model with GPTQ and EoRA: a job of several seconds, reporting every layer."""
    spec = spec_for(slow_llama_dir, calibration_txt, compensation={"method": "eora", "rank": 8})
    spec["quantization"] = {"method": "gptq", "bits": 4, "group_size": 32}
    spec["calibration"].update(num_samples=16, seq_len=64)
    return spec


def position(job: dict) -> tuple:
    return job["status"], job["progress"]["stage"], job["progress"]["layer"], job["progress"]["percent"]


def assert_reads_answer(client, job_id: str) -> None:
    one = client.get(f"/v1/jobs/{job_id}")
    assert one.status_code == 200 and one.json()["id"] == job_id, one.text
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200 and job_id in [j["id"] for j in listed.json()["items"]], listed.text
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_jobs_run_through_a_redis_restart(settings, client, tmp_path, slow_llama_dir, tiny_llama_dir,
                                          calibration_txt):
    with celery_worker(settings, tmp_path / "worker.log"):
        job_id = client.post("/v1/jobs", json=slow_spec(slow_llama_dir, calibration_txt)).json()["id"]
        before = wait_for(client, job_id, lambda j: j["status"] in TERMINAL or (j["progress"]["layer"] or 0) >= 2)
        assert before["status"] == "running", before
        with redis_stopped():
            assert_reads_answer(client, job_id)  # reads need only the database
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "broker unreachable" in ready.json()["detail"], ready.text
            time.sleep(OUTAGE_SECONDS)
        back = time.monotonic()
        done = wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
        finished_after = time.monotonic() - back
        assert done["status"] == "succeeded" and done["attempt"] == 1, done

        # the worker reconnected: a job sent after the restart runs too
        second_id = client.post("/v1/jobs", json=spec_for(tiny_llama_dir, calibration_txt)).json()["id"]
        wait_for(client, second_id, lambda j: j["status"] != "queued")
        second_started_after = time.monotonic() - back
        second = wait_for(client, second_id, lambda j: j["status"] in TERMINAL)
    assert second["status"] == "succeeded", second
    print(f"\nredis restart at layer {before['progress']['layer']}/12: running job finished {finished_after:.1f} s "
          f"after redis was back; a job sent after the first ended started {second_started_after:.1f} s after")


def test_a_job_runs_through_a_postgres_restart_without_a_retry(settings, client, tmp_path, slow_llama_dir,
                                                                 calibration_txt):
    worker_log = tmp_path / "worker.log"
    with celery_worker(settings, worker_log):
        job_id = client.post("/v1/jobs", json=slow_spec(slow_llama_dir, calibration_txt)).json()["id"]
        before = wait_for(client, job_id, lambda j: j["status"] in TERMINAL or (j["progress"]["layer"] or 0) >= 2)
        assert before["status"] == "running", before
        with postgres_stopped():
            down = client.get(f"/v1/jobs/{job_id}")
            assert down.status_code == 503 and down.json()["error"] == "unavailable", down.text
            time.sleep(OUTAGE_SECONDS)
        back = time.monotonic()
        answer = client.get(f"/v1/jobs/{job_id}")  # the API's dead pooled connections are replaced
        assert answer.status_code == 200, answer.text
        at_back = position(answer.json())
        wait_for(client, job_id, lambda j: position(j) != at_back)
        moved_after = time.monotonic() - back
        done = wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
        finished_after = time.monotonic() - back
    # the worker retried its writes through the outage: same attempt, no requeue, no failure
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert "database unreachable" in worker_log.read_text()
    messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["items"]]
    assert not any("lease expired" in m for m in messages), messages
    layers = [m.split()[1] for m in messages if m.startswith("layer ")]
    assert layers == [f"{i}/12" for i in range(1, 13)], layers  # no layer's report lost, none twice
    print(f"\npostgres down {OUTAGE_SECONDS:g} s at layer {before['progress']['layer']}/12: the API answered at once "
          f"when it was back, the job moved {moved_after:.1f} s and finished {finished_after:.1f} s after")


def test_a_job_submitted_while_the_broker_is_down_runs_when_it_returns(settings, client, tmp_path, tiny_llama_dir,
                                                                         calibration_txt):
    with celery_worker(settings, tmp_path / "worker.log"):
        with redis_stopped():
            started = time.monotonic()
            response = client.post("/v1/jobs", json=spec_for(tiny_llama_dir, calibration_txt))
            submit_seconds = time.monotonic() - started
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            assert_reads_answer(client, job_id)
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            time.sleep(OUTAGE_SECONDS)
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # nothing could wake a worker
        back = time.monotonic()
        wait_for(client, job_id, lambda j: j["status"] != "queued")  # the reaper re-sent it
        started_after = time.monotonic() - back
        done = wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
        finished_after = time.monotonic() - back
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    print(f"\nsubmit with redis down answered 201 in {submit_seconds:.2f} s; once redis was back the job started "
          f"{started_after:.1f} s and finished {finished_after:.1f} s after")
    assert submit_seconds < 10  # generous: a send gives up after two tries of broker_timeout_seconds at most
