"""A job's Hugging Face token and the caller's API key appear nowhere they should not: not in any
response, event, log line, broker message, artifact or upload, and in the database only as ciphertext
(the token, erased when the job ends) and as a sha256 (the key).

Real `squeeze serve` (embedded: SQLite file, filesystem broker, its own worker process) with auth on.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

import httpx
from sqlalchemy import create_engine, text

from app.settings import Settings
from tests.services import api_server, bearer, create_api_key

TERMINAL = {"succeeded", "failed", "cancelled"}


def files_holding(folder, needles: list[bytes]) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file()
            and any(needle in path.read_bytes() for needle in needles)]


def test_token_and_api_key_never_leak(tmp_path, tiny_llama_dir, calibration_txt):
    settings = Settings(data_dir=tmp_path / "data", auth="on", queue_name=f"squeeze-leak-{uuid.uuid4().hex[:8]}")
    hf_token = f"hf_{secrets.token_urlsafe(24)}"
    log_path = tmp_path / "serve.log"
    responses: list[httpx.Response] = []

    def record(response: httpx.Response) -> None:
        response.read()
        responses.append(response)
    with api_server(settings, log_path) as base:  # with its worker
        key = create_api_key(settings, "team-leak")
        with httpx.Client(base_url=base, headers=bearer(key), timeout=60,
                          event_hooks={"response": [record]}) as http:
            upload = http.post("/v1/uploads", files={"file": ("cal.txt", calibration_txt.read_bytes())}).json()
            spec = {"model": {"id": str(tiny_llama_dir)},
                    "quantization": {"method": "rtn", "bits": 8, "group_size": 32},
                    "calibration": {"dataset": upload["dataset"], "num_samples": 4, "seq_len": 32},
                    "evaluation": {"num_windows": 2}, "hf_token": hf_token}
            job = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "leak-1"}).json()
            assert http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "leak-1"}).json()["id"] == job["id"]
            deadline = time.monotonic() + 180
            while job["status"] not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.3)
                job = http.get(f"/v1/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", (job, log_path.read_text()[-3000:])
            http.get(f"/v1/jobs/{job['id']}/events")
            http.get("/v1/jobs")
            http.get("/v1/uploads")
            bad = http.post("/v1/jobs", json={**spec, "calibration": {"dataset": "upload:" + "0" * 32}})
            assert bad.status_code == 422  # an error answer that echoes a request must not echo the token

    needles = [hf_token.encode(), key.encode(), key.split("_", 2)[2].encode()]  # also the key's secret alone
    assert all(len(n) >= 32 for n in needles)  # an empty needle would be "found" everywhere
    assert len(responses) >= 8
    for response in responses:
        seen = response.content + repr(dict(response.headers)).encode()
        assert not [n for n in needles if n in seen], (response.request.url, response.text[:500])
    events = [r for r in responses if r.request.url.path.endswith("/events")][0].json()["items"]
    assert len(events) >= 5  # the whole run's event log was checked
    assert not [n for n in needles if n in log_path.read_bytes()], "a secret is in the server/worker log"
    broker = settings.broker_dir
    assert any(p.is_file() for p in broker.rglob("*")) and files_holding(broker, needles) == []
    assert any(p.is_file() for p in settings.artifacts_dir.rglob("*"))
    assert files_holding(settings.artifacts_dir, needles) == []
    assert files_holding(settings.uploads_dir, needles) == []
    # the database files (main file and write-ahead log), byte for byte
    assert files_holding(settings.data_dir, needles) == []
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT key_hash FROM api_keys")).scalar_one() == hashlib.sha256(key.encode()).hexdigest()
        assert conn.execute(text("SELECT sealed_token FROM jobs")).scalar_one() is None  # erased at the end
    engine.dispose()
