"""Artifact download endpoints without a worker: a succeeded job is written straight into the database
(as the worker's `succeed` writes it) next to a real folder below the artifact root. Only the job's
recorded files, only inside its own folder, only for its own tenant."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
from fastapi.testclient import TestClient

from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.jobs import repository
from app.main import create_app
from app.settings import Settings
from tests.services import bearer, create_api_key

SPEC = {"model": {"id": "org/model"}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
        "calibration": {"dataset": "org/data"}}


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", auth="on")


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings, run_reaper=False)) as client:
        client.headers.update(bearer(create_api_key(settings, "tenant-a")))
        yield client


def finished_job(settings, uri: str | None, files: list[str], tenant: str = "tenant-a",
                 status: str = "succeeded") -> uuid.UUID:
    """A job of `tenant` in `status`, with the artifacts record a worker writes."""
    from sqlalchemy import update

    from app.db.models import Job, JobStatus

    engine = make_engine(settings)
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            job = repository.add_job(session, SPEC, 3, tenant_id=tenant)
            artifacts = {"uri": uri or f"local:{job.id}", "files": files}
            session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus(status), artifacts=artifacts))
            return job.id
    finally:
        engine.dispose()


def write_artifact(settings, job_id: uuid.UUID) -> dict[str, bytes]:
    folder = settings.artifacts_dir / str(job_id)
    contents = {"config.json": b'{"a": 1}\n', "adapter/adapter_model.safetensors": os.urandom(3 * 1024**2 + 7)}
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    # a manifest as the export writes it; it lists the other files but not itself
    manifest = {"files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in contents.items()}}
    contents["squeeze.json"] = json.dumps(manifest).encode()
    (folder / "squeeze.json").write_bytes(contents["squeeze.json"])
    return contents


def test_listing_and_download_return_the_files_bytes(client, settings):
    job_id = finished_job(settings, None, ["adapter/adapter_model.safetensors", "config.json", "squeeze.json"])
    contents = write_artifact(settings, job_id)
    listing = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    assert listing.json()["uri"] == f"local:{job_id}"
    assert {f["path"]: (f["bytes"], f["sha256"]) for f in listing.json()["files"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in contents.items()}
    for name, data in contents.items():
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 200 and response.content == data
        assert response.headers["content-length"] == str(len(data))


def test_a_manifest_whose_size_is_stale_is_not_trusted(client, settings):
    job_id = finished_job(settings, None, ["config.json", "squeeze.json"])
    write_artifact(settings, job_id)
    (settings.artifacts_dir / str(job_id) / "config.json").write_bytes(b"changed since the manifest")
    files = {f["path"]: f["sha256"] for f in client.get(f"/v1/jobs/{job_id}/artifacts").json()["files"]}
    assert files["config.json"] == hashlib.sha256(b"changed since the manifest").hexdigest()


def test_another_tenants_job_is_404(client, settings):
    create_api_key(settings, "tenant-b")
    job_id = finished_job(settings, None, ["config.json"], tenant="tenant-b")
    write_artifact(settings, job_id)
    for path in ("", "/config.json"):
        response = client.get(f"/v1/jobs/{job_id}/artifacts{path}")
        assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_files_not_recorded_for_the_job_are_404(client, settings):
    job_id = finished_job(settings, None, ["config.json"])
    write_artifact(settings, job_id)
    (settings.data_dir / "secret.txt").write_text("server file")
    for path in ("squeeze.json", "adapter/adapter_model.safetensors", "%2E%2E/%2E%2E/secret.txt",
                 "..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd", "nope"):
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{path}")
        assert response.status_code == 404, (path, response.text)


@pytest.mark.parametrize("recorded", ["../../secret.txt", "/etc/passwd", "./config.json", "adapter//x"])
def test_a_recorded_list_naming_paths_outside_the_folder_serves_nothing(client, settings, recorded):
    """A tampered artifacts record: the folder check still holds."""
    job_id = finished_job(settings, None, [recorded])
    write_artifact(settings, job_id)
    (settings.data_dir / "secret.txt").write_text("server file")
    assert client.get(f"/v1/jobs/{job_id}/artifacts").status_code == 404
    path = recorded.replace("/", "%2F")
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{path}")
    assert response.status_code == 404 and b"server file" not in response.content


def test_symlinks_are_not_followed(client, settings, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the job's")
    job_id = finished_job(settings, None, ["config.json", "link.json", "adapter/adapter_model.safetensors"])
    write_artifact(settings, job_id)
    folder = settings.artifacts_dir / str(job_id)
    (folder / "link.json").symlink_to(outside)
    response = client.get(f"/v1/jobs/{job_id}/artifacts/link.json")
    assert response.status_code == 404 and b"not the job's" not in response.content
    # a symlinked folder on the way to a recorded file
    (folder / "adapter").rename(tmp_path / "adapter")
    (folder / "adapter").symlink_to(tmp_path / "adapter")
    assert client.get(f"/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/artifacts/config.json").status_code == 200


def test_a_job_folder_that_is_a_symlink_or_outside_the_root_serves_nothing(client, settings, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    linked = finished_job(settings, "local:linked", ["config.json"])
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    (settings.artifacts_dir / "linked").symlink_to(tmp_path / "elsewhere")
    escaping = finished_job(settings, "local:../../elsewhere", ["config.json"])
    for job_id in (linked, escaping):
        assert client.get(f"/v1/jobs/{job_id}/artifacts/config.json").status_code == 404


def test_s3_and_hub_artifacts_are_a_409_naming_their_uri(client, settings):
    for uri in ("s3://bucket/prefix/job", "hf://org/repo@0123abcd"):
        job_id = finished_job(settings, uri, ["config.json"])
        for path in ("", "/config.json"):
            response = client.get(f"/v1/jobs/{job_id}/artifacts{path}")
            assert response.status_code == 409
            body = response.json()
            assert body["error"] == "artifact_not_local" and body["uri"] == uri and uri in body["detail"]


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_job_that_did_not_succeed_has_no_artifacts(client, settings, status):
    job_id = finished_job(settings, None, ["config.json"], status=status)
    response = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert response.status_code == 409 and status in response.json()["detail"]
