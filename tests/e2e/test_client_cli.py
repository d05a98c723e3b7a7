"""The client commands against a real `squeeze serve` (API, worker and reaper processes, embedded mode,
API keys on), run as a user runs them: `python -m app.cli ...` in a child process. Exit codes are
what scripts rely on (app/remote_cli.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from app.client import ApiError, SqueezeClient, Unreachable
from app.db.session import upgrade_database
from app.remote_cli import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_PENDING,
    EXIT_REFUSED,
    EXIT_SUCCEEDED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from app.settings import Settings
from tests.e2e.test_jobs import spec_for
from tests.services import ROOT, Receiver, api_server, artifact_dir, create_api_key, free_port, verified


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, settings, API key of tenant-a)."""
    data_dir = tmp_path_factory.mktemp("client-cli")
    settings = Settings(data_dir=data_dir, auth="on", lease_seconds=20)
    upgrade_database(settings)
    key = create_api_key(settings, "tenant-a")
    webhooks = {"SQUEEZE_WEBHOOK_ALLOW_PRIVATE": "true", "SQUEEZE_WEBHOOK_INTERVAL_SECONDS": "0.2"}
    with api_server(settings, data_dir / "serve.log", env=webhooks) as base:
        yield base, settings, key


def squeeze(server, *args: str, key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base, _, default_key = server
    env = {**os.environ, "SQUEEZE_SERVER": base, "SQUEEZE_API_KEY": key or default_key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_spec(tmp_path, spec: dict):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_submit_wait_succeeds_then_status_logs_download_and_webhook(server, tiny_llama_dir, calibration_txt,
                                                                     tmp_path):
    _, settings, _ = server
    hook = Receiver([200])
    started = time.monotonic()
    run = squeeze(server, "submit", "--spec", write_spec(tmp_path, spec_for(tiny_llama_dir, calibration_txt)),
                  "--bits", "3", "--webhook-url", hook.url, "--wait", "--poll", "0.2")
    assert run.returncode == EXIT_SUCCEEDED, run.stderr
    print(f"submit --wait of a tiny job: {time.monotonic() - started:.1f} s")
    assert "succeeded" in run.stdout and "perplexity" in run.stdout  # the metrics are printed
    assert "layer 2/2" in run.stderr  # the progress bar reached the last layer
    job_id = run.stdout.split()[1].rstrip(":")

    status = squeeze(server, "status", job_id, "--json")
    assert status.returncode == EXIT_SUCCEEDED
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded" and job["spec"]["quantization"]["bits"] == 3  # the flag beat the file
    assert f"{job['metrics']['perplexity_after']:.3f}" in run.stdout

    logs = squeeze(server, "logs", job_id, "--follow", "--json")
    assert logs.returncode == EXIT_SUCCEEDED
    events = [json.loads(line) for line in logs.stdout.splitlines()]
    assert events[0]["stage"] == "queued" and events[-1]["stage"] == "done"
    assert len({e["id"] for e in events}) == len(events)  # each event once

    listed = json.loads(squeeze(server, "jobs", "--json", "--status", "succeeded").stdout)
    assert job_id in [item["id"] for item in listed["items"]]

    out = tmp_path / "downloaded"
    download = squeeze(server, "download", job_id, str(out))
    assert download.returncode == EXIT_SUCCEEDED, download.stderr
    published = artifact_dir(settings, job)
    expected = {p.relative_to(published).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in published.rglob("*") if p.is_file() and p.name != ".squeeze-owner.json"}
    got = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in out.rglob("*") if p.is_file()}
    assert got == expected and "config.json" in got and "squeeze.json" in got

    # the serve's reaper process POSTed the success, signed with the tenant's secret
    (headers, body), = hook.wait_for(1)
    hook.close()
    secret = json.loads(squeeze(server, "webhook-secret", "--json").stdout)["secret"]
    payload = verified(secret, headers, body)
    assert payload["event"] == "job.succeeded" and payload["job"] == {**job, "updated_at": payload["job"]["updated_at"]}

    # `status` lists the delivery once the reaper has recorded the receiver's answer
    deadline = time.monotonic() + 20
    while "  webhook job.succeeded: delivered (attempt 1: HTTP 200)" not in (shown := squeeze(server, "status",
                                                                                            job_id)).stdout:
        assert time.monotonic() < deadline, shown.stdout + shown.stderr
        time.sleep(0.2)
    assert shown.returncode == EXIT_SUCCEEDED and shown.stdout.splitlines()[0] == f"job {job_id}: succeeded"


def test_a_failed_job_exits_1_with_its_reason(server, tiny_llama_dir, calibration_txt):
    run = squeeze(server, "submit", str(tiny_llama_dir), "--calibration", str(calibration_txt), "--num-samples", "8",
                  "--seq-len", "32", "--quant-method", "rtn", "--group-size", "128", "--json", "--wait", "--poll", "0.2")
    assert run.returncode == EXIT_FAILED, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "failed" and "group_size 128 does not divide" in job["error"]


def test_a_cancelled_job_exits_3(server, slow_llama_dir, calibration_txt, tmp_path):
    spec = spec_for(slow_llama_dir, calibration_txt)
    spec["calibration"].update(num_samples=64, seq_len=128)
    submitted = squeeze(server, "submit", "--spec", write_spec(tmp_path, spec))
    assert submitted.returncode == EXIT_SUCCEEDED, submitted.stderr
    job_id = submitted.stdout.strip()
    assert squeeze(server, "status", job_id).returncode in (EXIT_PENDING, EXIT_CANCELLED)
    assert squeeze(server, "cancel", job_id).returncode == EXIT_SUCCEEDED
    follow = squeeze(server, "logs", job_id, "--follow", "--poll", "0.2")
    assert follow.returncode == EXIT_CANCELLED, follow.stdout + follow.stderr
    assert follow.stdout.splitlines()[-1].split()[1] == "cancelled"
    assert squeeze(server, "status", job_id).returncode == EXIT_CANCELLED


def test_client_errors_have_their_own_exit_codes(server, tmp_path):
    unknown = squeeze(server, "status", str(uuid.uuid4()), "--json")
    assert unknown.returncode == EXIT_REFUSED and json.loads(unknown.stdout)["error"] == "not_found"
    invalid = squeeze(server, "submit", "org/model", "--calibration", "org/data", "--bits", "5")
    assert invalid.returncode == EXIT_REFUSED and "quantization.bits" in invalid.stderr
    bad_key = squeeze(server, "jobs", key="sqz_000000000000_" + "a" * 43)
    assert bad_key.returncode == EXIT_REFUSED and "401" in bad_key.stderr
    unreadable = squeeze(server, "submit", "--spec", str(tmp_path / "missing.json"))
    assert unreadable.returncode == EXIT_USAGE and "missing.json" in unreadable.stderr
    nobody = squeeze(server, "jobs", "--server", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == EXIT_UNREACHABLE and "ConnectError" in nobody.stderr


def test_another_tenant_sees_neither_the_job_nor_its_files(server, tiny_llama_dir, calibration_txt, tmp_path):
    base, settings, key = server
    with SqueezeClient(base, key) as client:
        job = client.wait(client.submit(spec_for(tiny_llama_dir, calibration_txt)).id, poll_seconds=0.2, timeout=240)
        assert job.status.value == "succeeded"
        assert {f.path for f in client.artifacts(job.id).files} >= {"config.json", "squeeze.json"}
    with SqueezeClient(base, create_api_key(settings, "tenant-b")) as other:
        for call in (lambda: other.job(job.id), lambda: other.artifacts(job.id),
                     lambda: other.download(job.id, tmp_path / "stolen")):
            with pytest.raises(ApiError) as refused:
                call()
            assert refused.value.status == 404
    assert not (tmp_path / "stolen").exists()
    with pytest.raises(Unreachable):
        SqueezeClient(f"http://127.0.0.1:{free_port()}", key).jobs()
