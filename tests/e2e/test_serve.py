"""`squeeze serve` — what `make run` calls — runs the API, a worker and a reaper from one command, embedded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import update

from app.db.base import db_now
from app.db.models import Job
from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.jobs import repository
from app.settings import Settings
from tests.services import ROOT, free_port, wait_ready


def test_serve_runs_a_job_with_no_external_server(tmp_path, tiny_llama_dir, calibration_txt):
    port = free_port()
    env = {**os.environ, "SQUEEZE_TORCH_THREADS": "1", "SQUEEZE_BROKER_POLLING_INTERVAL": "0.1",
           "SQUEEZE_DATABASE_URL": "", "SQUEEZE_BROKER_URL": ""}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, tmp_path / "serve.log")
        spec = {"model": {"id": str(tiny_llama_dir)},
                "quantization": {"method": "rtn", "bits": 8, "group_size": 32},
                "calibration": {"dataset": str(calibration_txt), "num_samples": 4, "seq_len": 32},
                "evaluation": {"num_windows": 2}}
        job = httpx.post(f"{base}/v1/jobs", json=spec).json()
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text()[-3000:])
        assert (tmp_path / "data" / "squeeze.db").is_file()
        assert job["artifacts"]["uri"] == f"local:{job['id']}"
        assert (tmp_path / "data" / "artifacts" / job["id"] / "squeeze.json").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_serve_runs_the_reaper_as_a_child_process_and_stops_it(tmp_path):
    """The API process runs no reaper thread under serve: the requeue below is the child's work."""
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data")
    env = {**os.environ, "SQUEEZE_REAPER_INTERVAL_SECONDS": "0.2", "SQUEEZE_DATABASE_URL": "", "SQUEEZE_BROKER_URL": ""}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(port),
                             "--data-dir", str(settings.data_dir)], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        (reaper,) = [pid for pid in _children(proc.pid) if b"reaper" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        spec = {"model": {"id": "org/model"}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
                "calibration": {"dataset": "org/data"}}
        job = httpx.post(f"{base}/v1/jobs", json=spec).json()
        engine = make_engine(settings)
        with unit_of_work(make_sessionmaker(engine)) as s:  # a worker took it and died
            assert repository.claim(s, uuid.UUID(job["id"]), "dead", 60) == 1
            s.execute(update(Job).where(Job.id == uuid.UUID(job["id"])).values(lease_expires_at=db_now(-1)))
        engine.dispose()
        deadline = time.monotonic() + 30
        while (job := httpx.get(f"{base}/v1/jobs/{job['id']}").json())["status"] != "queued":
            assert time.monotonic() < deadline, (job, log.read_text()[-3000:])
            time.sleep(0.2)
        assert job["attempt"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not Path(f"/proc/{reaper}").exists(), "serve left its reaper running"
    assert "reaper: SIGTERM, stopping" in log.read_text()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
