"""Two promises of issue 18, proved with real worker processes:
- a job's message delivered twice, to two workers at once, makes one run and one artifact;
- a cancel inside a long decoder layer stops the job within seconds (checked after every Linear),
  not at the end of the layer. The long layer comes from tests/faults (slow_linear), not from a hook
  in production code."""

from __future__ import annotations

import time
import uuid

from fastapi.testclient import TestClient

from app.db.session import make_engine, make_sessionmaker, upgrade_database
from app.main import create_app
from app.queue import Dispatcher
from app.settings import Settings
from tests.e2e.test_jobs import TERMINAL, spec_for, wait_for
from tests.faults import fault_env
from tests.services import (
    REDIS_URL,
    artifact_dir,
    bearer,
    celery_worker,
    create_api_key,
    fresh_postgres_database,
)

SLOW_LINEAR_SECONDS = 3.0  # a 2-layer LLaMA's layer then takes 7 x 3 s = 21 s


def test_a_message_delivered_to_two_workers_runs_the_job_once(tmp_path, tiny_llama_dir, calibration_txt):
    with fresh_postgres_database() as url:
        settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                            queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}", local_roots=[tmp_path.parent.parent],
                            reaper_interval_seconds=3600)
        upgrade_database(settings)
        engine = make_engine(settings)
        dispatcher = Dispatcher(settings, make_sessionmaker(engine))
        try:
            with TestClient(create_app(settings)) as client:
                client.headers.update(bearer(create_api_key(settings)))
                with celery_worker(settings, tmp_path / "w1.log"), celery_worker(settings, tmp_path / "w2.log"):
                    job = client.post("/v1/jobs", json=spec_for(tiny_llama_dir, calibration_txt)).json()
                    assert dispatcher.dispatch(uuid.UUID(job["id"]))  # the same message again: two in the queue
                    job = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)
                    time.sleep(2)  # let the second message be consumed too
                events = client.get(f"/v1/jobs/{job['id']}/events").json()["items"]
        finally:
            dispatcher.close()
            engine.dispose()
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert sum("claimed by a worker" in e["message"] for e in events) == 1
    assert sum(e["stage"] == "done" for e in events) == 1
    folders = [p.name for p in settings.artifacts_dir.iterdir()]
    assert folders == [artifact_dir(settings, job).name]
    consumed = sum(("not queued" in (tmp_path / log).read_text()) for log in ("w1.log", "w2.log"))
    assert consumed == 1, "the duplicate message was not dropped by exactly one worker"


def test_cancel_inside_a_long_layer_stops_within_seconds(tmp_path, tiny_llama_dir, calibration_txt):
    settings = Settings(data_dir=tmp_path / "data", broker_polling_interval=0.1, cancel_grace_seconds=120)
    with TestClient(create_app(settings)) as client:
        with celery_worker(settings, tmp_path / "worker.log", extra_env=fault_env(f"slow_linear={SLOW_LINEAR_SECONDS}")):
            job = client.post("/v1/jobs", json=spec_for(tiny_llama_dir, calibration_txt)).json()
            # the perplexity before is in: the worker is inside layer 1, sleeping before its first Linear
            wait_for(client, job["id"], lambda j: j["status"] in TERMINAL or j["progress"]["percent"] >= 10)
            time.sleep(1.0)
            asked = time.monotonic()
            assert client.post(f"/v1/jobs/{job['id']}/cancel", json={}).status_code == 200
            job = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)
            stopped_after = time.monotonic() - asked
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["items"]
    assert job["status"] == "cancelled", job
    assert not any(e["message"].startswith("layer 1/2") for e in events)  # stopped inside layer 1
    # A check between layers alone would stop after the layer's 21 s; one per Linear within ~3 s.
    assert stopped_after < 10, f"cancel took {stopped_after:.1f} s"
    print(f"cancel inside a {7 * SLOW_LINEAR_SECONDS:.0f} s layer: stopped {stopped_after:.2f} s after the request")
