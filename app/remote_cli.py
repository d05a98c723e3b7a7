"""`squeeze submit | status | jobs | cancel | logs | download`: the REST API from a shell, through
app.client, against --server (or SQUEEZE_SERVER) with SQUEEZE_API_KEY.

Exit codes, for scripts:
    0  the job succeeded (submit --wait, status, logs --follow), or the request was done
    1  the job failed
    2  usage error (bad flags, unreadable --spec file)
    3  the job was cancelled
    4  the server refused the request (HTTP 4xx: invalid spec, unknown job, bad key, ...)
    5  no usable answer (connection refused, timeout, HTTP 5xx, a download whose sha256 differs)
    6  the job has not ended yet (status of a queued or running job)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from app.client import ApiError, ClientError, SqueezeClient
from app.db.models import JobStatus
from app.jobs.schemas import EventOut, JobOut
from app.webhooks.router import DeliveryPage

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_PENDING = range(7)
STATUS_EXIT = {JobStatus.succeeded: EXIT_SUCCEEDED, JobStatus.failed: EXIT_FAILED,
               JobStatus.cancelled: EXIT_CANCELLED, JobStatus.queued: EXIT_PENDING, JobStatus.running: EXIT_PENDING}
DEFAULT_SERVER = "http://127.0.0.1:8000"

stderr = Console(stderr=True)


def _client(args: argparse.Namespace) -> SqueezeClient:
    return SqueezeClient(args.server, os.environ.get("SQUEEZE_API_KEY") or None)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, default=str))


def _job_json(job: JobOut) -> dict:
    return job.model_dump(mode="json")


def _summary(job: JobOut) -> str:
    lines = [f"job {job.id}: {job.status.value}"]
    if not job.status.terminal:
        progress = job.progress
        layers = f", layer {progress.layer or 0} of {progress.layers}" if progress.layers else ""
        lines.append(f"  {progress.stage}{layers} ({progress.percent:.0f}%)")
    if job.error:
        lines.append(f"  error: {job.error}")
    metrics = job.metrics or {}
    before, after = metrics.get("perplexity_before"), metrics.get("perplexity_after")
    if before is not None and after is not None:
        lines.append(f"  perplexity {before:.3f} -> {after:.3f}")
    compression = metrics.get("compression") or {}
    error_before, error_after = (compression.get("mean_relative_error_before"),
                                 compression.get("mean_relative_error_after"))
    if error_before is not None and error_after is not None:
        lines.append(f"  mean relative output error {error_before:.4g} -> {error_after:.4g}")
    if job.artifacts and job.artifacts.get("uri"):
        lines.append(f"  artifact {job.artifacts['uri']}")
    return "\n".join(lines)


def _deliveries(page: DeliveryPage) -> str:
    """One line per webhook delivery: its event, state and each attempt's answer."""
    lines = []
    for delivery in page.items:
        attempts = ", ".join(f"attempt {a.attempt}: " + (f"HTTP {a.status_code}" if a.status_code is not None
                                                         else a.error or "no answer") for a in delivery.attempts)
        lines.append(f"  webhook {delivery.event}: {delivery.state.value} ({attempts or 'not sent yet'})")
    return "\n".join(lines)


def _finish(job: JobOut, as_json: bool) -> int:
    if as_json:
        _print_json(_job_json(job))
    else:
        print(_summary(job))
    return STATUS_EXIT[job.status]


class _ProgressBar:
    """Stage, layer i of n, elapsed and ETA on stderr, fed by the job's polled progress."""

    def __init__(self) -> None:
        self.bars = Progress(TextColumn("{task.description:<12}"), BarColumn(),
                             TextColumn("{task.fields[layers]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=stderr, transient=False)
        self.task = self.bars.add_task("queued", total=None, layers="")

    def __enter__(self) -> _ProgressBar:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def update(self, job: JobOut) -> None:
        progress = job.progress
        layers = f"layer {progress.layer or 0}/{progress.layers}" if progress.layers else ""
        self.bars.update(self.task, description=progress.stage, total=progress.layers, completed=progress.layer or 0,
                         layers=layers)


def cmd_submit(args: argparse.Namespace) -> int:
    from app.compress_args import spec_data_from_args

    spec = spec_data_from_args(args)
    if args.destination:
        spec["destination"] = {**(spec.get("destination") or {}), "uri": args.destination}
    if args.webhook_url:
        spec["webhook_url"] = args.webhook_url
    with _client(args) as client:
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        if not args.wait:
            if args.json:
                _print_json(_job_json(job))
            else:
                print(job.id)
            return EXIT_SUCCEEDED
        stderr.print(f"job {job.id} submitted")
        if args.json:
            job = client.wait(job.id, poll_seconds=args.poll)
        else:
            with _ProgressBar() as bar:
                job = client.wait(job.id, poll_seconds=args.poll, on_job=bar.update)
        return _finish(job, args.json)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job)
        if args.json or not job.spec.get("webhook_url"):
            return _finish(job, args.json)
        deliveries = client.webhooks(job.id)
    print(_summary(job))
    if deliveries.items:
        print(_deliveries(deliveries))
    return STATUS_EXIT[job.status]


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.jobs(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json(page.model_dump(mode="json"))
        return EXIT_SUCCEEDED
    table = Table(box=None)
    for column in ("id", "status", "stage", "layer", "model", "created"):
        table.add_column(column, overflow="fold")
    for job in page.items:
        layer = f"{job.progress.layer or 0}/{job.progress.layers}" if job.progress.layers else "-"
        table.add_row(str(job.id), job.status.value, job.progress.stage, layer, str(job.spec["model"]["id"]),
                      job.created_at.isoformat(timespec="seconds"))
    Console().print(table)
    if page.next_cursor:
        stderr.print(f"more: --cursor {page.next_cursor}")
    return EXIT_SUCCEEDED


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    if args.json:
        _print_json(_job_json(job))
    else:
        print(f"job {job.id}: {job.status.value}" + (" (cancel requested)" if job.status == JobStatus.running else ""))
    return EXIT_SUCCEEDED


def _print_event(event: EventOut, as_json: bool) -> None:
    if as_json:
        _print_json(event.model_dump(mode="json"))
    else:
        print(f"{event.created_at.isoformat(timespec='seconds')} {event.stage:<12} {event.level:<8} {event.message}",
              flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.follow:
            seen: dict[str, JobOut] = {}
            for event in client.follow(args.job, poll_seconds=args.poll, on_job=lambda job: seen.update(job=job)):
                _print_event(event, args.json)
            return STATUS_EXIT[seen["job"].status]
        after = 0
        while page := client.events(args.job, after=after).items:
            for event in page:
                _print_event(event, args.json)
            after = page[-1].id
        return EXIT_SUCCEEDED


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        paths = client.download(args.job, args.folder,
                                on_file=None if args.json else lambda path, size: stderr.print(f"{path} ({size:,} B)"))
    if args.json:
        _print_json([str(path) for path in paths])
    else:
        print(f"{len(paths)} files in {args.folder}")
    return EXIT_SUCCEEDED


def cmd_webhook_secret(args: argparse.Namespace) -> int:
    with _client(args) as client:
        secret = client.webhook_secret(rotate=args.rotate)
    if args.json:
        _print_json({"secret": secret})
    else:
        print(secret)
    return EXIT_SUCCEEDED


def run_remote(args: argparse.Namespace) -> int:
    """Runs a remote command, turning client errors into their exit codes."""
    try:
        return args.remote_fn(args)
    except ApiError as exc:
        if args.json:
            _print_json({"error": exc.code, "status": exc.status, **exc.body})
        stderr.print(f"squeeze: the server refused it ({exc.status} {exc.code}): {exc.detail}"
                     + (f" (artifact at {exc.body['uri']})" if exc.body.get("uri") else ""), markup=False)
        return EXIT_REFUSED
    except ClientError as exc:
        if args.json:
            _print_json({"error": "unreachable", "detail": str(exc)})
        stderr.print(f"squeeze: {exc}", markup=False)
        return EXIT_UNREACHABLE
    except (OSError, ValueError) as exc:  # an unreadable or malformed --spec file
        stderr.print(f"squeeze: {exc}", markup=False)
        return EXIT_USAGE


def add_remote_commands(sub: argparse._SubParsersAction) -> None:
    from app.compress_args import add_spec_arguments

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("SQUEEZE_SERVER", DEFAULT_SERVER),
                        help=f"the API's base URL (default SQUEEZE_SERVER, else {DEFAULT_SERVER}); the key is "
                             "read from SQUEEZE_API_KEY")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def command(name: str, fn, help: str, job: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=help, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        if job:
            parser.add_argument("job", help="job id")
        parser.set_defaults(fn=run_remote, remote_fn=fn)
        return parser

    submit = command("submit", cmd_submit, "submit a job to a server (spec flags and/or --spec file)", job=False)
    add_spec_arguments(submit)
    submit.add_argument("--destination", help="destination.uri: a folder below the server's artifact root, "
                                              "s3://bucket/prefix or hf://org/repo (default: the job's own folder)")
    submit.add_argument("--webhook-url", help="POSTed, signed, when the job ends (see `squeeze webhook-secret`)")
    submit.add_argument("--idempotency-key", help="a retry with the same key returns the first job")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end, with a progress bar; the exit "
                                                            "code says how it ended")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")

    command("status", cmd_status, "a job's status, stage and layer, metrics, webhook deliveries; exit code by its "
                                  "state")
    jobs = command("jobs", cmd_jobs, "the newest jobs", job=False)
    jobs.add_argument("--status", choices=[s.value for s in JobStatus])
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--cursor", help="the next page (printed after a full page)")
    command("cancel", cmd_cancel, "cancel a queued or running job")
    logs = command("logs", cmd_logs, "a job's event log")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends; the exit code "
                                                                  "says how it ended")
    logs.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")
    download = command("download", cmd_download, "a succeeded job's local artifact files, each checked by sha256")
    download.add_argument("folder", type=Path)
    secret = command("webhook-secret", cmd_webhook_secret, "the secret that signs your webhooks (X-Squeeze-Signature)",
                     job=False)
    secret.add_argument("--rotate", action="store_true", help="replace it first (retries are signed with the new one)")


EXIT_CODES = __doc__[__doc__.index("Exit codes"):]
