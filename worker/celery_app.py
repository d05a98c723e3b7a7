"""The Celery app. Imports no torch: the API process uses it to send messages.

The database is the source of truth; a message only wakes a worker, so a lost or duplicated one
neither loses nor double-runs a job (the worker's claim is a conditional UPDATE).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.settings import Settings

RUN_JOB = "squeeze.run_job"


def celery_config(settings: Settings) -> dict:
    transport_options: dict = {}
    url = settings.celery_broker_url
    if url.startswith("filesystem://"):
        for folder in ("in", "processed", "control"):
            (settings.broker_dir / folder).mkdir(parents=True, exist_ok=True)
        # One folder for in and out: producers and consumers meet there. Consumed files are deleted.
        transport_options = {
            "data_folder_in": str(settings.broker_dir / "in"),
            "data_folder_out": str(settings.broker_dir / "in"),
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval,
        }
    elif url.startswith(("redis://", "rediss://")):
        # Unacked messages come back after this; keep it above the hard time limit. The socket
        # timeouts bound a publish to a Redis that is down or hung (without them it can wait forever).
        transport_options = {"visibility_timeout": settings.job_time_limit + 600,
                             "socket_connect_timeout": settings.broker_timeout_seconds,
                             "socket_timeout": settings.broker_timeout_seconds}
    return {
        "broker_url": url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue_name,
        # A send tries twice, then gives up: the job is already committed and the reaper re-sends it.
        "task_publish_retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.2},
        "task_queues": [Queue(settings.queue_name)],
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,  # the lease reaper, not the broker, retries lost jobs
        # A running job goes on when the broker connection drops (Redis restarts): its state is in the
        # database, and the broker only wakes workers. (Celery 6 would cancel it by default.)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": 1,  # one job per process: its memory (and GPU memory) goes with it
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("squeeze", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.squeeze_settings = settings
    return app
