"""The dashboard's pages and its read-only endpoints, through the app in-process (SQLite, no worker)."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from app.db.session import unit_of_work
from app.jobs import repository
from app.main import create_app
from app.settings import Settings
from tests.services import bearer, create_api_key
from tests.unit.test_api import SPEC


def _client(tmp_path):
    settings = Settings(data_dir=tmp_path, auth="on")
    client = TestClient(create_app(settings, run_reaper=False))
    return client, settings


def test_every_view_url_serves_the_page_with_a_strict_csp(tmp_path):
    client, _ = _client(tmp_path)
    with client:
        for path in ("/", f"/jobs/{uuid.uuid4()}", "/submit", "/compare"):
            page = client.get(path)
            assert page.status_code == 200 and '<main id="view">' in page.text, path
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert client.get("/jobs/not-a-job").status_code == 422
        script = client.get("/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]


def test_search_filters_by_model_and_pages_with_cursors_within_the_tenant(tmp_path):
    client, settings = _client(tmp_path)
    with client:
        mine, theirs = create_api_key(settings, "tenant-a"), create_api_key(settings, "tenant-b")
        def submit(model: str, key: str) -> str:
            response = client.post("/v1/jobs", json={**SPEC, "model": {"id": model}}, headers=bearer(key))
            assert response.status_code == 201, response.text
            return response.json()["id"]

        ids = [submit(f"Org/Model_{i}", mine) for i in range(3)]
        submit("org/modelx1", mine)  # "_" as a LIKE wildcard would match it
        submit("org/model_9", theirs)

        first = client.get("/v1/job-search", params={"model": "model_", "limit": 2}, headers=bearer(mine)).json()
        second = client.get("/v1/job-search", params={"model": "model_", "limit": 2, "cursor": first["next_cursor"]},
                            headers=bearer(mine)).json()
        assert [j["id"] for j in first["items"] + second["items"]] == ids[::-1]  # newest first, case-insensitive
        assert second["next_cursor"] is None
        # "%" and "_" are matched literally, not as LIKE wildcards.
        literal = client.get("/v1/job-search", params={"model": "l_1"}, headers=bearer(mine)).json()["items"]
        assert [j["id"] for j in literal] == [ids[1]]
        assert client.get("/v1/job-search", params={"model": "l%1"}, headers=bearer(mine)).json()["items"] == []
        assert client.get("/v1/job-search", params={"status": "succeeded"}, headers=bearer(mine)).json()["items"] == []
        assert client.get("/v1/job-search").status_code == 401


def test_stats_count_the_tenants_queue_and_recent_workers(tmp_path):
    client, settings = _client(tmp_path)
    with client:
        mine, theirs = create_api_key(settings, "tenant-a"), create_api_key(settings, "tenant-b")
        a1, a2, _a3 = (client.post("/v1/jobs", json=SPEC, headers=bearer(mine)).json()["id"] for _ in range(3))
        b1 = client.post("/v1/jobs", json=SPEC, headers=bearer(theirs)).json()["id"]
        with unit_of_work(client.app.state.sessions) as session:  # two pool processes of one worker host
            assert repository.claim(session, uuid.UUID(a1), "gpu-1:100:a1b2", 60) == 1
            assert repository.claim(session, uuid.UUID(a2), "gpu-1:101:c3d4", 60) == 1
            assert repository.claim(session, uuid.UUID(b1), "gpu-2:200:e5f6", 60) == 1
        stats = client.get("/v1/stats", headers=bearer(mine)).json()
        assert stats == {"queued": 1, "running": 2, "workers_recent": ["gpu-1"], "workers_window_seconds": 600}
        assert client.get("/v1/stats", headers=bearer(theirs)).json()["workers_recent"] == ["gpu-2"]
