"""`squeeze serve` — what `make run` calls — runs the API and a worker from one command, embedded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.services import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_a_job_with_no_external_server(tmp_path, tiny_llama_dir, calibration_txt):
    port = free_port()
    env = {**os.environ, "SQUEEZE_TORCH_THREADS": "1", "SQUEEZE_BROKER_POLLING_INTERVAL": "0.1",
           "SQUEEZE_DATABASE_URL": "", "SQUEEZE_BROKER_URL": ""}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
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
