"""Celery tasks: as thin as a web view. The logic lives in worker.jobrunner and worker.pipeline."""

from __future__ import annotations

import logging

from worker.celery_app import RUN_JOB, create_celery
from worker.jobrunner import run_job

log = logging.getLogger(__name__)

app = create_celery()
settings = app.conf.squeeze_settings


@app.task(name=RUN_JOB, ignore_result=True)
def run_job_task(job_id: str) -> str:
    outcome = run_job(job_id, settings)
    log.info("job %s: %s", job_id, outcome)
    return outcome
