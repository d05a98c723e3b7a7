"""`squeeze status` in human form, against a stand-in client: a running job's stage and layer, a finished
job's webhook deliveries (the real server's answers are in tests/e2e/test_client_cli.py)."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime

from app.jobs.schemas import JobOut
from app.remote_cli import EXIT_PENDING, EXIT_SUCCEEDED, cmd_status
from app.webhooks.router import DeliveryPage

NOW = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)


def job(status: str, stage: str, layer: int | None, layers: int | None, percent: float, **spec) -> JobOut:
    return JobOut.model_validate({
        "id": uuid.UUID(int=1), "tenant": "tenant-a", "status": status, "attempt": 1, "max_attempts": 3,
        "cancel_requested": False, "progress": {"stage": stage, "layer": layer, "layers": layers, "percent": percent},
        "spec": {"model": {"id": "org/model"}, **spec}, "error": None, "metrics": None, "artifacts": None,
        "created_at": NOW, "updated_at": NOW, "started_at": NOW, "finished_at": None})


class StandIn:
    def __init__(self, shown: JobOut, deliveries: list[dict]):
        self.shown, self.deliveries, self.asked = shown, deliveries, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def job(self, job_id):
        self.asked.append("job")
        return self.shown

    def webhooks(self, job_id):
        self.asked.append("webhooks")
        return DeliveryPage.model_validate({"items": self.deliveries})


def status(monkeypatch, capsys, client: StandIn, as_json: bool = False) -> tuple[int, str]:
    monkeypatch.setattr("app.remote_cli._client", lambda args: client)
    code = cmd_status(argparse.Namespace(job=str(client.shown.id), json=as_json))
    return code, capsys.readouterr().out


def test_a_running_job_shows_its_stage_and_layer(monkeypatch, capsys):
    client = StandIn(job("running", "compressing", 3, 12, 41.7), [])
    code, out = status(monkeypatch, capsys, client)
    assert code == EXIT_PENDING
    assert out.splitlines() == [f"job {uuid.UUID(int=1)}: running", "  compressing, layer 3 of 12 (42%)"]
    assert client.asked == ["job"]  # no webhook_url: no deliveries asked for


def test_a_finished_job_lists_each_webhook_attempt(monkeypatch, capsys):
    attempts = [{"attempt": 1, "at": NOW, "status_code": None, "error": "ConnectError: refused", "duration_ms": 2.0},
                {"attempt": 2, "at": NOW, "status_code": 200, "error": None, "duration_ms": 3.0}]
    delivery = {"id": uuid.UUID(int=2), "event": "job.succeeded", "url": "https://hooks.example/x", "state": "delivered",
                "attempts": attempts, "created_at": NOW, "next_attempt_at": None, "delivered_at": NOW}
    finished = job("succeeded", "done", 12, 12, 100.0, webhook_url="https://hooks.example/x")
    code, out = status(monkeypatch, capsys, StandIn(finished, [delivery]))
    assert code == EXIT_SUCCEEDED
    assert out.splitlines() == [f"job {finished.id}: succeeded", "  webhook job.succeeded: delivered "
                                "(attempt 1: ConnectError: refused, attempt 2: HTTP 200)"]

    client = StandIn(finished, [delivery])
    code, out = status(monkeypatch, capsys, client, as_json=True)
    assert json.loads(out) == finished.model_dump(mode="json") and client.asked == ["job"]  # --json: the job as before
