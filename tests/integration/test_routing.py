"""Routing by memory class on real PostgreSQL and Redis: a submitted job's message lands in the queue of
its class, and the reaper's re-send of a lost message goes to that same queue."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.models import Job
from app.db.session import unit_of_work
from app.main import create_app
from app.queue import Dispatcher
from app.reaper import reap_once
from tests.services import REDIS_URL, celery_worker, migrated_database
from tests.unit.test_routing import LLAMA_70B, TINY, model_folder, spec_for


@pytest.fixture
def pg(tmp_path):
    """(settings with classes of 1 and 16 GiB, sessions) on a fresh migrated database and a queue prefix of its own."""
    with migrated_database(tmp_path, auth="off", memory_classes_gib=[1, 16], allow_local_paths=True) as database:
        yield database


def waiting(queue: str) -> list[str]:
    """Job ids of the messages in one queue (kombu keeps a Redis list per queue)."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
            for raw in redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)]


def test_jobs_go_to_the_queue_of_their_class_and_the_reaper_resends_there(pg, tmp_path):
    settings, sessions = pg
    base = settings.queue_name
    specs = {"big": spec_for(model_folder(tmp_path, LLAMA_70B, "big")),  # about 11.6 GiB: class 16gib
             "tiny": spec_for(model_folder(tmp_path, TINY, "tiny")),  # class 1gib
             "unread": spec_for(str(tmp_path / "no-such-model"))}  # no config.json: any worker
    with TestClient(create_app(settings, run_reaper=False)) as client:
        jobs = {name: client.post("/v1/jobs", json=spec.model_dump(mode="json")).json() for name, spec in specs.items()}
    assert {name: job["memory_class"] for name, job in jobs.items()} == {"big": "16gib", "tiny": "1gib",
                                                                         "unread": "any"}
    sent = {queue: waiting(queue) for queue in (base, f"{base}.1gib", f"{base}.16gib")}
    assert sent == {base: [jobs["unread"]["id"]], f"{base}.1gib": [jobs["tiny"]["id"]],
                    f"{base}.16gib": [jobs["big"]["id"]]}
    with unit_of_work(sessions) as s:
        queues = dict(s.execute(update(Job).values(dispatched_at=None).returning(Job.id, Job.queue)).all())
    assert queues[uuid.UUID(jobs["big"]["id"])] == f"{base}.16gib"

    redis.Redis.from_url(REDIS_URL).delete(*sent)  # the messages are lost; the jobs look unsent
    dispatcher = Dispatcher(settings, sessions)
    try:
        assert reap_once(settings, sessions, dispatcher)["dispatched"] == 3
    finally:
        dispatcher.close()
    assert {queue: waiting(queue) for queue in sent} == sent


def test_a_worker_takes_the_classes_it_holds_and_leaves_the_larger_ones(pg, tmp_path):
    """`squeeze worker` advertising 2 GiB consumes the base queue and 1gib, not 16gib. The models are
    config-only folders, so each job it takes fails at loading: enough to show it was taken."""
    settings, sessions = pg
    base = settings.queue_name
    specs = {"big": spec_for(model_folder(tmp_path, LLAMA_70B, "big")),
             "tiny": spec_for(model_folder(tmp_path, TINY, "tiny")),
             "unread": spec_for(str(tmp_path / "no-such-model"))}
    with TestClient(create_app(settings, run_reaper=False)) as client:
        jobs = {name: client.post("/v1/jobs", json=spec.model_dump(mode="json")).json()["id"]
                for name, spec in specs.items()}
        log = tmp_path / "worker.log"
        with celery_worker(settings, log, {"SQUEEZE_MEMORY_CLASSES_GIB": "[1, 16]", "SQUEEZE_WORKER_MEMORY_GIB": "2"}):
            deadline = time.monotonic() + 90
            while any(client.get(f"/v1/jobs/{jobs[n]}").json()["status"] != "failed" for n in ("tiny", "unread")):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
            time.sleep(1.0)  # time enough to take the big one, if it wrongly could
            big = client.get(f"/v1/jobs/{jobs['big']}").json()
        assert f"consuming {base}, {base}.1gib\n" in log.read_text()
    assert (big["status"], big["attempt"], big["memory_class"]) == ("queued", 0, "16gib")
    assert waiting(f"{base}.16gib") == [jobs["big"]]
    assert waiting(base) == waiting(f"{base}.1gib") == []
