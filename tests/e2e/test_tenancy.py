"""Tenants, API keys, limits and browser safety, over real HTTP against `squeeze serve` on a real
PostgreSQL database (distributed mode: auth on by default). No worker: jobs stay queued.

Every response any test here gets is recorded; none may be a 5xx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.settings import Settings
from tests.services import REDIS_URL, ROOT, api_server, bearer, create_api_key, fresh_postgres_database, settings_env

SPEC = {
    "model": {"id": "org/model"},
    "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
    "calibration": {"dataset": "org/data"},
}
LIMITS = {
    "SQUEEZE_MAX_REQUEST_BYTES": str(64 * 1024),
    "SQUEEZE_MAX_UPLOAD_BYTES": str(1024**2),
    "SQUEEZE_TENANT_UPLOAD_QUOTA_BYTES": str(1536 * 1024),
    "SQUEEZE_MAX_QUEUED_JOBS_PER_TENANT": "5",
    "SQUEEZE_QUEUED_RETRY_AFTER_SECONDS": "17",
}
RESPONSES: list[httpx.Response] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, settings) of a running API on a fresh PostgreSQL database."""
    data_dir = tmp_path_factory.mktemp("tenancy")
    with fresh_postgres_database() as url:
        settings = Settings(data_dir=data_dir, database_url=url, broker_url=REDIS_URL,
                            queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}")
        assert settings.auth == "auto" and settings.auth_enabled  # distributed: keys required by default
        with api_server(settings, data_dir / "serve.log", "--no-worker", env=LIMITS) as base:
            yield base, settings
    assert RESPONSES and not [r for r in RESPONSES if r.status_code >= 500], "a 5xx was answered"


@pytest.fixture(scope="module")
def http(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=60, event_hooks={"response": [RESPONSES.append]}) as client:
        yield client


@pytest.fixture(scope="module")
def keys(server):
    _, settings = server
    return {"a": create_api_key(settings, "team-a"), "b": create_api_key(settings, "team-b"),
            "admin": create_api_key(settings, "ops", admin=True)}


@pytest.fixture(scope="module")
def owned(http, keys):
    """A job and an upload of tenant a."""
    job = http.post("/v1/jobs", json=SPEC, headers=bearer(keys["a"]))
    upload = http.post("/v1/uploads", files={"file": ("cal.txt", b"text of team a\n")}, headers=bearer(keys["a"]))
    assert job.status_code == 201 and upload.status_code == 201, (job.text, upload.text)
    assert job.json()["tenant"] == "team-a"
    return job.json()["id"], upload.json()["id"]


def endpoints(job_id: str, upload_id: str) -> list[tuple[str, str, dict]]:
    return [
        ("GET", "/v1/jobs", {}),
        ("POST", "/v1/jobs", {"json": SPEC}),
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("GET", f"/v1/jobs/{job_id}/events", {}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {"json": {}}),
        ("GET", "/v1/uploads", {}),
        ("POST", "/v1/uploads", {"files": {"file": ("cal.txt", b"text\n")}}),
        ("GET", f"/v1/uploads/{upload_id}", {}),
        ("DELETE", f"/v1/uploads/{upload_id}", {}),
    ]


def revoked_key(settings) -> str:
    key = create_api_key(settings, "team-gone")
    env = {**os.environ, **settings_env(settings)}
    listed = subprocess.run([sys.executable, "-m", "app.cli", "keys", "list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True).stdout
    key_id = key.split("_")[1]
    assert key_id in listed and key not in listed and key.split("_", 2)[2] not in listed  # ids, never keys
    out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "revoke", key_id], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert f"key {key_id} revoked" in out
    return key


@pytest.mark.parametrize("credential", ["missing", "not a bearer", "unknown key", "wrong secret", "revoked"])
def test_every_endpoint_is_401_without_a_valid_key(server, http, owned, credential):
    _, settings = server
    headers = {
        "missing": {},
        "not a bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "unknown key": bearer(f"sqz_{'0' * 12}_{'A' * 43}"),
        "wrong secret": bearer(create_api_key(settings, "team-x")[:-4] + "AAAA"),
        "revoked": bearer(revoked_key(settings)) if credential == "revoked" else {},
    }[credential]
    for method, path, kwargs in endpoints(*owned):
        response = http.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_tenants_job_and_upload_are_404_and_untouched(http, keys, owned):
    job_id, upload_id = owned
    b = bearer(keys["b"])
    unknown_job, unknown_upload = str(uuid.uuid4()), uuid.uuid4().hex
    for method, path, kwargs in endpoints(job_id, upload_id):
        if path in ("/v1/jobs", "/v1/uploads"):  # the lists: checked below
            continue
        theirs = http.request(method, path, headers=b, **kwargs)
        nobodys = http.request(method, path.replace(job_id, unknown_job).replace(upload_id, unknown_upload),
                               headers=b, **kwargs)
        assert theirs.status_code == 404, (method, path, theirs.text)
        # the same answer as for an id that does not exist (ids differ in the text only)
        assert theirs.json()["error"] == nobodys.json()["error"] == "not_found"
        assert theirs.json()["detail"].replace(job_id, "X").replace(upload_id, "X") == \
            nobodys.json()["detail"].replace(unknown_job, "X").replace(unknown_upload, "X")
    assert job_id not in http.get("/v1/jobs", headers=b).text
    assert upload_id not in http.get("/v1/uploads", headers=b).text
    borrowed = http.post("/v1/jobs", headers=b, json={**SPEC, "calibration": {"dataset": f"upload:{upload_id}"}})
    assert borrowed.status_code == 422 and borrowed.json()["fields"] == ["calibration.dataset"]
    # nothing b did reached a's job or upload
    a = bearer(keys["a"])
    assert http.get(f"/v1/jobs/{job_id}", headers=a).json()["status"] == "queued"
    assert http.get(f"/v1/uploads/{upload_id}", headers=a).status_code == 200
    own = http.post("/v1/jobs", headers=a, json={**SPEC, "calibration": {"dataset": f"upload:{upload_id}"}})
    assert own.status_code == 201


def test_admin_key_sees_every_tenant(http, keys, owned):
    job_id, upload_id = owned
    admin = bearer(keys["admin"])
    assert http.get(f"/v1/jobs/{job_id}", headers=admin).json()["tenant"] == "team-a"
    assert http.get(f"/v1/jobs/{job_id}/events", headers=admin).json()["items"][0]["stage"] == "queued"
    assert job_id in {j["id"] for j in http.get("/v1/jobs", params={"limit": 200}, headers=admin).json()["items"]}
    assert upload_id in {u["id"] for u in http.get("/v1/uploads", headers=admin).json()["items"]}


def test_idempotency_key_returns_the_first_job_and_refuses_another_body(http, keys):
    a = {**bearer(keys["a"]), "Idempotency-Key": "retry-1"}
    first = http.post("/v1/jobs", json=SPEC, headers=a)
    again = http.post("/v1/jobs", json=SPEC, headers=a)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = http.post("/v1/jobs", json={**SPEC, "model": {"id": "org/other"}}, headers=a)
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    # the same key from another tenant is that tenant's own
    b = http.post("/v1/jobs", json=SPEC, headers={**bearer(keys["b"]), "Idempotency-Key": "retry-1"})
    assert b.status_code == 201 and b.json()["id"] != first.json()["id"]


def test_twenty_concurrent_posts_with_one_idempotency_key_make_one_job(server, http):
    _, settings = server
    headers = {**bearer(create_api_key(settings, "team-retry")), "Idempotency-Key": "burst"}
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/jobs", json=SPEC, headers=headers), range(20)))
    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM jobs WHERE tenant_id = 'team-retry'")).scalar()
    engine.dispose()
    assert count == 1


def test_body_too_large_is_413_counted_as_it_streams(http, keys):
    a = bearer(keys["a"])
    big = {**SPEC, "calibration": {"dataset": "org/data", "text_field": "x" * 100_000}}
    declared = http.post("/v1/jobs", json=big, headers=a)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"
    body = json.dumps(big).encode()
    chunked = http.post("/v1/jobs", content=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                        headers={**a, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers  # nothing declared: the server counted
    assert chunked.status_code == 413 and chunked.json()["error"] == "too_large"


def test_upload_size_and_tenant_quota_are_413_and_deleting_frees_quota(server, http):
    _, settings = server
    q = bearer(create_api_key(settings, "team-quota"))
    too_big = http.post("/v1/uploads", files={"file": ("big.txt", b"x" * (1024**2 + 1))}, headers=q)
    assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"
    first = http.post("/v1/uploads", files={"file": ("one.txt", b"y" * 900_000)}, headers=q)
    assert first.status_code == 201 and first.json()["bytes"] == 900_000
    second = http.post("/v1/uploads", files={"file": ("two.txt", b"z" * 900_000)}, headers=q)
    assert second.status_code == 413 and "quota" in second.json()["detail"]
    assert http.delete(f"/v1/uploads/{first.json()['id']}", headers=q).status_code == 204
    assert http.get(f"/v1/uploads/{first.json()['id']}", headers=q).status_code == 404
    assert http.post("/v1/uploads", files={"file": ("two.txt", b"z" * 900_000)}, headers=q).status_code == 201
    stored = sorted(p.name for p in settings.uploads_dir.iterdir())
    assert not [name for name in stored if name.endswith(".partial")]  # refused uploads left nothing
    assert f"{first.json()['id']}.txt" not in stored


@pytest.mark.parametrize("patch,field", [
    ({"calibration": {"dataset": "org/data", "seed": 10**30}}, "calibration.seed"),
    ({"calibration": {"dataset": "org/data", "seed": 2**63}}, "calibration.seed"),
    ({"calibration": {"dataset": "org/data", "num_samples": 10**30}}, "calibration.num_samples"),
    ({"calibration": {"dataset": "org/data", "text_field": "t" * 256}}, "calibration.text_field"),
    ({"calibration": {"dataset": "org/data", "split": "s" * 256}}, "calibration.split"),
    ({"model": {"id": "org/model", "revision": "r" * 256}}, "model.revision"),
    ({"destination": {"uri": "s3://bucket/" + "p" * 1100}}, "destination.uri"),
])
def test_overlong_strings_and_overflowing_integers_are_422(http, keys, patch, field):
    response = http.post("/v1/jobs", json={**SPEC, **patch}, headers=bearer(keys["a"]))
    assert response.status_code == 422, response.text
    assert response.json()["fields"] == [field]


def test_events_after_beyond_64_bits_is_422(http, keys, owned):
    job_id, _ = owned
    a = bearer(keys["a"])
    overflow = http.get(f"/v1/jobs/{job_id}/events", params={"after": 2**63}, headers=a)
    assert overflow.status_code == 422 and overflow.json()["fields"] == ["query.after"]
    largest = http.get(f"/v1/jobs/{job_id}/events", params={"after": 2**63 - 1}, headers=a)
    assert largest.status_code == 200 and largest.json()["items"] == []


def test_queued_jobs_per_tenant_is_429_with_retry_after(server, http):
    _, settings = server
    crowd = bearer(create_api_key(settings, "team-crowd"))
    statuses = [http.post("/v1/jobs", json=SPEC, headers=crowd).status_code for _ in range(5)]
    assert statuses == [201] * 5
    refused = http.post("/v1/jobs", json=SPEC, headers=crowd)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "17"
    assert refused.json()["error"] == "too_many_queued"
    job_id = http.get("/v1/jobs", headers=crowd).json()["items"][0]["id"]
    assert http.post(f"/v1/jobs/{job_id}/cancel", headers=crowd).json()["status"] == "cancelled"
    assert http.post("/v1/jobs", json=SPEC, headers=crowd).status_code == 201  # a slot came free


def test_cross_site_writes_foreign_hosts_and_cors(http, keys, owned):
    job_id, _ = owned
    a = bearer(keys["a"])
    evil = http.post(f"/v1/jobs/{job_id}/cancel", headers={**a, "Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"] == "cross_site"
    assert http.get(f"/v1/jobs/{job_id}", headers=a).json()["status"] == "queued"
    same = http.get(f"/v1/jobs/{job_id}", headers={**a, "Origin": "https://evil.example"})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers  # CORS off
    preflight = http.options(f"/v1/jobs/{job_id}/cancel", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    rebound = http.get("/v1/jobs", headers={**a, "Host": "attacker.example"})
    assert rebound.status_code == 400


def test_serve_refuses_a_public_address_without_auth(tmp_path):
    env = {**os.environ, "SQUEEZE_DATA_DIR": str(tmp_path), "SQUEEZE_DATABASE_URL": "", "SQUEEZE_AUTH": "auto"}
    refused = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--no-worker"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in refused.stderr
