"""What cancelled queued jobs cost a worker: N submit-then-cancel requests, then one real job.

    python -m bench.cancelled_queue --cancelled 50 [--mode distributed|embedded]

A real API (in process) and a real `squeeze worker` process; the real job compresses a tiny LLaMA.
Prints JSON: the real job's wait from submit to start, with and without the cancelled backlog, and
the cost per cancelled message. Needs PostgreSQL and Redis for --mode distributed (tests/services.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.fixtures_models import SAMPLE_DOCS, build_tiny_model, make_tokenizer
from tests.services import REDIS_URL, celery_worker, fresh_postgres_database


def tiny_files(folder: Path) -> tuple[Path, Path]:
    tokenizer = make_tokenizer()
    model_dir = folder / "tiny-llama"
    build_tiny_model("llama_tied", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calibration = folder / "calibration.txt"
    calibration.write_text("\n\n".join(SAMPLE_DOCS * 3) + "\n")
    return model_dir, calibration


def wait_to_start(client: TestClient, model_dir: Path, calibration: Path) -> tuple[float, str]:
    """Seconds from submit until a worker starts the job (and its final status)."""
    spec = {"model": {"id": str(model_dir)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
            "calibration": {"dataset": str(calibration), "num_samples": 4, "seq_len": 32},
            "evaluation": {"num_windows": 2}}
    submitted = time.monotonic()
    job = client.post("/v1/jobs", json=spec).json()
    started = None
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if started is None and job["status"] == "running":
            started = time.monotonic() - submitted
        time.sleep(0.02)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    return (started if started is not None else time.monotonic() - submitted), job["status"]


def measure(settings: Settings, cancelled: int, model_dir: Path, calibration: Path) -> dict:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with TestClient(create_app(settings)) as client, celery_worker(settings, settings.data_dir / "worker.log"):
        warm, status = wait_to_start(client, model_dir, calibration)  # the first job pays the imports
        assert status == "succeeded", status
        baseline, _ = wait_to_start(client, model_dir, calibration)
        t0 = time.monotonic()
        for _ in range(cancelled):
            job = client.post("/v1/jobs", json={"model": {"id": str(model_dir)},
                                                "quantization": {"method": "rtn"},
                                                "calibration": {"dataset": str(calibration)}}).json()
            assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        submit_seconds = time.monotonic() - t0
        delayed, status = wait_to_start(client, model_dir, calibration)
        assert status == "succeeded", status
    return {"cancelled": cancelled, "first_job_start_s": round(warm, 3), "baseline_start_s": round(baseline, 3),
            "start_after_backlog_s": round(delayed, 3), "submit_and_cancel_s": round(submit_seconds, 3),
            "per_cancelled_message_s": round((delayed - baseline) / max(cancelled, 1), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancelled", type=int, default=50)
    parser.add_argument("--mode", choices=["distributed", "embedded"], default="distributed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, calibration = tiny_files(folder)
        common = dict(data_dir=folder / "data", lease_seconds=30, broker_polling_interval=0.1,
                      local_roots=[folder], torch_threads=1)
        if args.mode == "embedded":
            result = measure(Settings(**common), args.cancelled, model_dir, calibration)
        else:
            with fresh_postgres_database() as url:
                settings = Settings(**common, database_url=url, broker_url=REDIS_URL,
                                    queue_name=f"squeeze-bench-{uuid.uuid4().hex[:8]}")
                from app.db.session import upgrade_database

                upgrade_database(settings)
                result = measure(settings, args.cancelled, model_dir, calibration)
    print(json.dumps({"mode": args.mode, **result}, indent=2))


if __name__ == "__main__":
    main()
