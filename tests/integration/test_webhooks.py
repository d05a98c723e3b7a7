"""Webhooks end to end without a worker: a job with a webhook_url reaches a terminal state (a cancel
while queued, or the repository's transitions as a worker or the reaper makes them), the delivery is
queued in that transaction, and the API's own sender thread POSTs it to a real HTTP receiver on
loopback, which checks the signature. Both databases: SQLite (embedded) and PostgreSQL (built by the
migrations, Redis broker)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Tenant, WebhookDelivery
from app.db.session import unit_of_work, upgrade_database
from app.jobs import repository
from app.jobs.service import request_hash
from app.jobs.spec import JobSpec
from app.main import create_app
from app.settings import Settings
from app.webhooks.addresses import WebhookRefused, check_url
from app.webhooks.sender import deliver_due
from tests.services import REDIS_URL, Receiver, bearer, create_api_key, fresh_postgres_database, verified

SPEC = {"model": {"id": "org/model"}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
        "calibration": {"dataset": "org/data"}}


@pytest.fixture
def receiver():
    made = []
    yield lambda codes=(200,): made.append(Receiver(list(codes))) or made[-1]
    for r in made:
        r.close()


FAST = dict(webhook_allow_private=True, webhook_interval_seconds=0.05, webhook_backoff_seconds=0.1,
            webhook_max_attempts=3, webhook_timeout_seconds=2, reaper_interval_seconds=3600)


@pytest.fixture(params=["embedded", "postgres"])
def settings(request, tmp_path):
    if request.param == "embedded":
        yield Settings(data_dir=tmp_path / "data", auth="on", **FAST)
        return
    with fresh_postgres_database() as url:
        settings = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                            queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}", secret_key=_fernet_key(), **FAST)
        upgrade_database(settings)
        yield settings


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:  # with its reaper and webhook sender threads
        client.headers.update(bearer(create_api_key(settings, "tenant-a")))
        yield client


def deliveries(client, job_id) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/webhooks")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def settled(client, job_id, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while (items := deliveries(client, job_id)) == [] or items[0]["state"] != state:
        assert time.monotonic() < deadline, items
        time.sleep(0.05)
    return items[0]


def test_a_cancelled_job_posts_one_signed_delivery(client, receiver):
    hook = receiver()
    secret = client.get("/v1/webhook-secret").json()["secret"]
    job = client.post("/v1/jobs", json={**SPEC, "webhook_url": hook.url}).json()
    assert job["spec"]["webhook_url"] == hook.url and deliveries(client, job["id"]) == []  # nothing before the end
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    (headers, body), = hook.wait_for(1)
    payload = verified(secret, headers, body)
    assert payload["event"] == "job.cancelled" and headers["X-Squeeze-Event"] == "job.cancelled"
    assert payload["job"]["id"] == job["id"] and payload["job"]["status"] == "cancelled"
    assert headers["X-Squeeze-Delivery"] == payload["id"]
    delivery = settled(client, job["id"], "delivered")
    assert delivery["id"] == payload["id"] and delivery["url"] == hook.url
    assert [(a["attempt"], a["status_code"], a["error"]) for a in delivery["attempts"]] == [(1, 200, None)]
    time.sleep(0.3)  # several sender passes later, still one request
    assert len(hook.requests) == 1


def test_a_receiver_failing_once_is_retried_with_the_same_signed_body(client, receiver):
    hook = receiver([500, 200])
    job = client.post("/v1/jobs", json={**SPEC, "webhook_url": hook.url}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    (first_headers, first), (second_headers, second) = hook.wait_for(2)
    secret = client.get("/v1/webhook-secret").json()["secret"]  # made at submit
    assert first == second and verified(secret, second_headers, second)["event"] == "job.cancelled"
    assert first_headers["X-Squeeze-Delivery"] == second_headers["X-Squeeze-Delivery"]
    delivery = settled(client, job["id"], "delivered")
    assert [(a["status_code"], a["error"]) for a in delivery["attempts"]] == [(500, "HTTP 500"), (200, None)]
    assert delivery["attempts"][1]["at"] > delivery["attempts"][0]["at"]
    time.sleep(0.3)
    assert len(hook.requests) == 2  # exactly one 2xx, then no more


def test_a_receiver_that_never_answers_2xx_is_given_up_after_max_attempts(client, receiver, settings):
    hook = receiver([503])
    job = client.post("/v1/jobs", json={**SPEC, "webhook_url": hook.url}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    delivery = settled(client, job["id"], "failed")
    assert [a["status_code"] for a in delivery["attempts"]] == [503] * settings.webhook_max_attempts
    assert delivery["next_attempt_at"] is None
    time.sleep(0.5)
    assert len(hook.requests) == settings.webhook_max_attempts


def test_terminal_transitions_of_workers_and_the_reaper_queue_a_delivery(client, settings):
    """succeed and fail (a worker), release_expired (the reaper failing a job whose worker died):
    each queues exactly one delivery of its state, in its own transaction."""
    sessions = client.app.state.sessions
    url = "http://127.0.0.1:9/never-called"  # a closed port: the sender records failures, never 2xx
    events = {}
    for outcome in ("succeeded", "failed", "reaped"):
        with unit_of_work(sessions) as session:
            job = repository.add_job(session, SPEC, 1, tenant_id="tenant-a", webhook_url=url)
            attempt = repository.claim(session, job.id, "worker-1", lease_seconds=0.01 if outcome == "reaped" else 60)
            if outcome == "succeeded":
                assert repository.succeed(session, job.id, attempt, "worker-1", {}, {"uri": "local:x", "files": []})
            elif outcome == "failed":
                assert repository.fail(session, job.id, attempt, "worker-1", "broken")
                assert not repository.fail(session, job.id, attempt, "worker-1", "again")  # no second delivery
        if outcome == "reaped":
            time.sleep(0.05)
            with unit_of_work(sessions) as session:
                assert repository.release_expired(session, repository.get_job(session, job.id)).value == "failed"
        events[outcome] = [d["event"] for d in deliveries(client, job.id)]
    assert events == {"succeeded": ["job.succeeded"], "failed": ["job.failed"], "reaped": ["job.failed"]}
    with unit_of_work(sessions) as session:  # a job without a webhook_url queues nothing
        job = repository.add_job(session, SPEC, 1, tenant_id="tenant-a")
        repository.request_cancel(session, job)
        assert session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)).all() == []


def test_the_address_is_checked_again_before_each_post(settings, receiver):
    """Allowed at submit, then refused at delivery (as when a name re-resolves to an internal address):
    the attempt is recorded with the refusal and nothing reaches the receiver."""
    hook = receiver()
    with TestClient(create_app(settings, run_reaper=False)) as client:  # no sender thread: this test sends
        client.headers.update(bearer(create_api_key(settings, "tenant-a")))
        job = client.post("/v1/jobs", json={**SPEC, "webhook_url": hook.url}).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        strict = settings.model_copy(update={"webhook_allow_private": False})
        assert deliver_due(strict, client.app.state.sessions) == 1
        delivery = deliveries(client, job["id"])[0]
    assert delivery["state"] == "pending" and delivery["attempts"][0]["status_code"] is None
    assert "127.0.0.1" in delivery["attempts"][0]["error"] and "private, loopback" in delivery["attempts"][0]["error"]
    assert hook.requests == []


def test_deliveries_and_secrets_belong_to_their_tenant(client, settings):
    job = client.post("/v1/jobs", json={**SPEC, "webhook_url": "http://127.0.0.1:9/x"}).json()
    other = bearer(create_api_key(settings, "tenant-b"))
    assert client.get(f"/v1/jobs/{job['id']}/webhooks", headers=other).status_code == 404
    mine = client.get("/v1/webhook-secret").json()["secret"]
    theirs = client.get("/v1/webhook-secret", headers=other).json()["secret"]
    assert mine != theirs and mine.startswith("whsec_")
    rotated = client.post("/v1/webhook-secret/rotate").json()["secret"]
    assert rotated != mine and client.get("/v1/webhook-secret").json()["secret"] == rotated
    with unit_of_work(client.app.state.sessions) as session:  # sealed at rest, not the secret itself
        stored = session.get(Tenant, "tenant-a").sealed_webhook_secret
    assert stored and rotated not in stored and rotated.removeprefix("whsec_") not in stored


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "https://127.0.0.1/hook", "https://10.1.2.3/hook", "https://192.168.0.1/",
    "https://169.254.169.254/latest/meta-data", "https://[::1]/hook", "https://localhost/hook",
    "https://[::ffff:127.0.0.1]/hook", "ftp://example.com/hook", "https://user:pw@localhost/hook",
    "https://no-such-host.invalid/hook",
])
def test_private_or_unsafe_urls_are_refused_at_submit(tmp_path, url):
    settings = Settings(data_dir=tmp_path / "data", auth="on")  # webhook_allow_private off: the default
    with TestClient(create_app(settings, run_reaper=False)) as client:
        client.headers.update(bearer(create_api_key(settings, "tenant-a")))
        response = client.post("/v1/jobs", json={**SPEC, "webhook_url": url})
        assert response.status_code == 422, response.text
        assert response.json()["fields"] == ["webhook_url"]
        assert client.get("/v1/jobs").json()["items"] == []


def public_dns(*answers: str):
    return lambda host, port: list(answers)


def test_address_rules_after_resolution():
    public = "93.184.216.34"
    target = check_url("https://hooks.example.com/x?y=1", False, public_dns(public))
    assert (target.pinned_url, target.host_header) == (f"https://{public}:443/x?y=1", "hooks.example.com")
    with pytest.raises(WebhookRefused, match="https"):
        check_url("http://hooks.example.com/x", False, public_dns(public))
    with pytest.raises(WebhookRefused, match="10.0.0.7"):  # one internal answer among public ones is enough
        check_url("https://hooks.example.com/x", False, public_dns(public, "10.0.0.7"))
    with pytest.raises(WebhookRefused, match="100.64.0.1"):  # shared address space is not public either
        check_url("https://hooks.example.com/x", True, public_dns("100.64.0.1"))
    # allowed private: loopback over http too, but a public name still needs https
    assert check_url("http://localhost:8000/x", True, public_dns("127.0.0.1")).host_header == "localhost:8000"
    with pytest.raises(WebhookRefused, match="https"):
        check_url("http://hooks.example.com/x", True, public_dns(public))



def test_a_request_without_webhook_url_hashes_as_before_the_field_existed():
    """An Idempotency-Key retry that spans the upgrade still finds its job; a webhook_url changes the hash."""
    spec = JobSpec.model_validate(SPEC)
    before = {key: value for key, value in spec.model_dump(mode="json").items() if key != "webhook_url"}
    assert request_hash(spec) == hashlib.sha256(json.dumps({"spec": before, "hf_token": None},
                                                           sort_keys=True).encode()).hexdigest()
    assert request_hash(JobSpec.model_validate({**SPEC, "webhook_url": "https://x.example/h"})) != request_hash(spec)
