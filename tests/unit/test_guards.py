"""Upload retention and the auth-off guards, through the app in-process (SQLite)."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.base import utcnow
from app.db.models import Upload
from app.main import create_app
from app.reaper import reap_once
from app.settings import Settings
from tests.unit.test_api import SPEC


def test_reaper_deletes_uploads_past_their_retention(tmp_path):
    settings = Settings(data_dir=tmp_path, upload_retention_hours=24)
    with TestClient(create_app(settings, run_reaper=False)) as client:
        local = {"Authorization": "Bearer local"}  # auth off: any bearer header marks a non-form write
        old = client.post("/v1/uploads", files={"file": ("old.txt", b"old text\n")}, headers=local).json()
        new = client.post("/v1/uploads", files={"file": ("new.txt", b"new text\n")}, headers=local).json()
        state = client.app.state
        with state.sessions.begin() as session:
            session.execute(update(Upload).where(Upload.id == old["id"]).values(created_at=utcnow() - timedelta(hours=25)))
        counts = reap_once(settings, state.sessions, state.dispatcher)
        assert counts["uploads_expired"] == 1
        assert client.get(f"/v1/uploads/{old['id']}").status_code == 404
        assert client.get(f"/v1/uploads/{new['id']}").json()["bytes"] == len(b"new text\n")
        assert sorted(p.name for p in settings.uploads_dir.iterdir()) == [f"{new['id']}.txt"]
        refused = client.post("/v1/jobs", json={**SPEC, "calibration": {"dataset": old["dataset"]}})
        assert refused.status_code == 422 and refused.json()["fields"] == ["calibration.dataset"]


def test_with_auth_off_a_write_needs_a_bearer_header_or_json(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert not settings.auth_enabled  # embedded default
    with TestClient(create_app(settings, run_reaper=False)) as client:
        job = client.post("/v1/jobs", json=SPEC).json()
        assert job["tenant"] == "default"
        form = client.post(f"/v1/jobs/{job['id']}/cancel", data={"x": "1"})
        assert form.status_code == 403 and form.json()["error"] == "cross_site"
        upload = client.post("/v1/uploads", files={"file": ("cal.txt", b"text\n")})
        assert upload.status_code == 403
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
        same_origin = client.post(f"/v1/jobs/{job['id']}/cancel", headers={
            "Origin": "http://testserver", "Content-Type": "application/json"})
        assert same_origin.status_code == 200 and same_origin.json()["status"] == "cancelled"


def test_configured_cors_origin_may_write_and_gets_cors_headers(tmp_path):
    settings = Settings(data_dir=tmp_path, cors_origins=["https://ui.example"])
    with TestClient(create_app(settings, run_reaper=False)) as client:
        preflight = client.options("/v1/jobs", headers={"Origin": "https://ui.example",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        created = client.post("/v1/jobs", json=SPEC, headers={"Origin": "https://ui.example"})
        assert created.status_code == 201
        assert client.post("/v1/jobs", json=SPEC, headers={"Origin": "https://other.example"}).status_code == 403
