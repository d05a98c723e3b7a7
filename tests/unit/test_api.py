"""The HTTP API without a worker: jobs are stored, listed, paged and cancelled; errors have one shape."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.services import bearer, create_api_key

SPEC = {
    "model": {"id": "org/model"},
    "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
    "calibration": {"dataset": "org/data"},
}


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", auth="on")


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings, run_reaper=False)) as client:
        client.headers.update(bearer(create_api_key(settings)))
        yield client


def test_create_returns_the_job_resource(client, settings):
    response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "queued"
    assert job["progress"] == {"stage": "queued", "layer": None, "layers": None, "percent": 0.0}
    assert job["error"] is None and job["metrics"] is None and job["artifacts"] is None
    assert job["spec"]["quantization"]["group_size"] == 32
    assert job["spec"]["model"]["revision"] == "main"  # defaults are filled in and stored
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    # the wake-up message went to the (filesystem) broker after the commit
    assert len(list((settings.broker_dir / "in").glob("*.msg"))) == 1


def test_unknown_job_is_404_with_error_body(client):
    response = client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("patch,field", [
    ({"destination": {"uri": "gs://bucket/x"}}, "destination.uri"),
])
def test_methods_the_worker_cannot_run_are_refused(client, patch, field):
    response = client.post("/v1/jobs", json={**SPEC, **patch})
    assert response.status_code == 422
    assert response.json()["error"] == "not_supported_yet"
    assert response.json()["fields"] == [field]
    assert "not supported yet" in response.json()["detail"]


def test_local_destination_must_stay_inside_the_artifact_root(client):
    response = client.post("/v1/jobs", json={**SPEC, "destination": {"uri": "/etc/squeeze"}})
    assert response.status_code == 422
    assert response.json()["fields"] == ["destination.uri"]


def test_local_paths_refused_when_not_allowed(tmp_path):
    settings = Settings(data_dir=tmp_path, allow_local_paths=False, local_roots=[tmp_path / "models"])
    with TestClient(create_app(settings, run_reaper=False)) as client:
        response = client.post("/v1/jobs", json={**SPEC, "model": {"id": "/opt/secret-model"}})
        assert response.status_code == 422 and response.json()["fields"] == ["model.id"]
        allowed = client.post("/v1/jobs", json={**SPEC, "model": {"id": str(tmp_path / "models" / "m")}})
        assert allowed.status_code == 201


def test_server_limits_name_the_field(tmp_path):
    settings = Settings(data_dir=tmp_path, max_num_samples=16)
    with TestClient(create_app(settings, run_reaper=False)) as client:
        spec = {**SPEC, "calibration": {"dataset": "org/data", "num_samples": 17}}
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 422 and response.json()["fields"] == ["calibration.num_samples"]


def test_list_is_newest_first_with_cursor_pages_and_status_filter(client):
    ids = [client.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = client.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    seen = [j["id"] for page in (first, second, third) for j in page["items"]]
    assert seen == list(reversed(ids))
    assert third["next_cursor"] is None
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", params={"cursor": "garbage"}).json()["error"] == "bad_cursor"
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422


def test_cancel_queued_job_and_its_events(client):
    job = client.post("/v1/jobs", json=SPEC).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["stage"] for e in events["items"]] == ["queued", "cancelled"]
    later = client.get(f"/v1/jobs/{job['id']}/events", params={"after": events["next_after"]}).json()
    assert later["items"] == [] and later["next_after"] == events["next_after"]


def test_upload_then_use_as_calibration_dataset(client):
    upload = client.post("/v1/uploads", files={"file": ("cal.txt", b"some text\n\nmore text\n")})
    assert upload.status_code == 201
    dataset = upload.json()["dataset"]
    assert client.post("/v1/jobs", json={**SPEC, "calibration": {"dataset": dataset}}).status_code == 201
    missing = client.post("/v1/jobs", json={**SPEC, "calibration": {"dataset": "upload:" + "0" * 32}})
    assert missing.status_code == 422 and missing.json()["fields"] == ["calibration.dataset"]
    bad = client.post("/v1/uploads", files={"file": ("cal.exe", b"MZ")})
    assert bad.status_code == 422


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


def test_readiness_fails_when_the_broker_is_down(tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, run_reaper=False)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable" and "broker" in response.json()["detail"]
        # submitting still works: the job is stored, and stays unsent for the reaper
        job = client.post("/v1/jobs", json=SPEC)
        assert job.status_code == 201 and job.json()["status"] == "queued"


def test_dashboard_page_is_served_and_keeps_the_key_in_the_tab(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in response.text
    script = client.get("/static/api.js").text
    assert "sessionStorage.getItem(KEY)" in script and '"Authorization": `Bearer ${key}`' in script
    assert "localStorage" not in script and "innerHTML" not in script


def test_job_token_is_sealed_never_returned_and_erased_when_the_job_ends(client, settings):
    from sqlalchemy import create_engine, text

    job = client.post("/v1/jobs", json={**SPEC, "hf_token": "hf_supersecret"})
    assert job.status_code == 201
    assert "hf_supersecret" not in job.text and "hf_token" not in job.json()["spec"]
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        sealed, spec = conn.execute(text("SELECT sealed_token, spec FROM jobs")).one()
    assert sealed and "hf_supersecret" not in sealed and "hf_supersecret" not in spec
    from app.secrets import unseal

    assert unseal(settings, sealed) == "hf_supersecret"
    client.post(f"/v1/jobs/{job.json()['id']}/cancel")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sealed_token FROM jobs")).scalar() is None
    engine.dispose()


def test_job_token_refused_without_a_server_key_in_distributed_mode(tmp_path):
    from app.errors import InvalidSpec
    from app.secrets import seal

    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://nowhere/db")
    with pytest.raises(InvalidSpec, match="SQUEEZE_SECRET_KEY"):
        seal(settings, "hf_x", "hf_token")


def test_list_items_leave_out_the_per_module_table_that_the_job_itself_keeps(client, settings):
    from app.db.session import make_engine, make_sessionmaker, unit_of_work
    from app.jobs import repository

    metrics = {"perplexity_after": 12.5, "size": {"bits_per_weight_stored": 4.5},
               "compression": {"modules": 2, "max_rank": 4, "per_module": {"a": {"rank": 4}, "b": {"rank": 4}}}}
    job_id = uuid.UUID(client.post("/v1/jobs", json=SPEC).json()["id"])
    engine = make_engine(settings)
    with unit_of_work(make_sessionmaker(engine)) as session:  # what the worker does when the job ends
        attempt = repository.claim(session, job_id, "w1", 60)
        assert repository.succeed(session, job_id, attempt, "w1", metrics, {"uri": "x"})
    engine.dispose()
    listed = client.get("/v1/jobs").json()["items"][0]["metrics"]
    assert listed == {**metrics, "compression": {"modules": 2, "max_rank": 4}}
    assert client.get(f"/v1/jobs/{job_id}").json()["metrics"] == metrics  # the job itself keeps the table
    assert client.get("/v1/job-search?model=org").json()["items"][0]["metrics"] == listed
