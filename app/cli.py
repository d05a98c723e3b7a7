"""`squeeze serve | worker | reaper | migrate | keys | compress`, and the client commands of app/remote_cli.py."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.settings import Settings


def _worker_argv(settings: Settings, loglevel: str, queues: list[str]) -> list[str]:
    return [
        "worker", f"--loglevel={loglevel}", "-Q", ",".join(queues),
        f"--concurrency={settings.worker_concurrency}", "--pool=prefork", f"--hostname=squeeze-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def worker_queues(settings: Settings) -> list[str]:
    """The base queue, and with memory classes set, the queue of every class this worker's memory holds."""
    from app.jobs.routing import worker_queues as queues_for_memory

    if not settings.memory_classes_gib:
        return [settings.queue_name]
    from worker.capacity import advertised_memory

    memory, source = advertised_memory(settings)
    queues = queues_for_memory(settings, memory)
    held = f"{memory / 1024**3:.1f} GiB, {source}" if memory is not None else source
    print(f"squeeze worker: memory {held}; consuming {', '.join(queues)}", file=sys.stderr, flush=True)
    return queues


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.tasks import app, settings

    app.worker_main(_worker_argv(settings, args.loglevel, worker_queues(settings)))
    return 0


def cmd_reaper(args: argparse.Namespace) -> int:
    import logging

    from app.db.session import upgrade_database
    from app.reaper import run_reaper_process

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if settings.embedded:
        upgrade_database(settings)  # distributed mode: migrations are run by the operator
    return run_reaper_process(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db.session import upgrade_database

    upgrade_database(Settings(), args.revision)
    return 0


def _keys_session():
    from app.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade_database

    settings = Settings()
    if settings.embedded:
        upgrade_database(settings)
    return unit_of_work(make_sessionmaker(make_engine(settings)))


def cmd_keys(args: argparse.Namespace) -> int:
    from app import auth
    from app.errors import InvalidSpec

    with _keys_session() as session:
        if args.keys_command == "create":
            try:
                key = auth.create_key(session, args.tenant, admin=args.admin)
            except InvalidSpec as exc:
                print(f"squeeze keys: {exc.detail}", file=sys.stderr)
                return 2
            print(key)
            print(f"key for tenant {args.tenant!r}{' (admin)' if args.admin else ''}: shown once, only its hash "
                  "is stored", file=sys.stderr)
        elif args.keys_command == "list":
            print(f"{'id':<14}{'tenant':<24}{'admin':<7}{'created':<27}revoked")
            for key in auth.list_keys(session):
                print(f"{key.id:<14}{key.tenant_id:<24}{'yes' if key.admin else 'no':<7}"
                      f"{key.created_at.isoformat(timespec='seconds'):<27}"
                      f"{key.revoked_at.isoformat(timespec='seconds') if key.revoked_at else '-'}")
        else:
            revoked = auth.revoke_key(session, args.key_id)
            if revoked is None:
                print(f"squeeze keys: no key with id {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"key {args.key_id} revoked at {revoked.isoformat(timespec='seconds')}")
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start_child(command: str, loglevel: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", command, "--loglevel", loglevel], env=os.environ.copy())


def _exit_through_finally(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db.session import upgrade_database
    from app.main import create_app

    if args.data_dir:
        os.environ["SQUEEZE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = Settings()
    if not settings.auth_enabled and not is_loopback(args.host):
        print(f"squeeze: refusing to serve on {args.host} without API keys: anyone who can reach it could read "
              "and cancel every job. Set SQUEEZE_AUTH=on and create keys with `squeeze keys create`, or serve on "
              "127.0.0.1.", file=sys.stderr)
        return 2
    upgrade_database(settings)
    children = []
    if not args.no_worker:
        children.append(_start_child("worker", args.loglevel))
    if not args.no_reaper:  # its own process, not a thread of the API's: several `serve`s may run it
        children.append(_start_child("reaper", args.loglevel))
    print(f"squeeze: API on http://{args.host}:{args.port} (docs at /docs), data in {settings.data_dir}, "
          f"database {'SQLite' if settings.embedded else 'external'}, broker {settings.celery_broker_url.split('://')[0]}, "
          + ("API keys required" if settings.auth_enabled else "auth OFF (no API keys; loopback only)"),
          flush=True)
    # uvicorn handles SIGTERM, shuts down, then raises it again for the handler that was there before:
    # the default one would end the process here, before `finally` stops the children.
    signal.signal(signal.SIGTERM, _exit_through_finally)
    try:
        uvicorn.run(create_app(settings, run_reaper=False), host=args.host, port=args.port,
                    log_level=args.loglevel.lower())
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from worker.cli_compress import main as compress_main

    return compress_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeeze", description="LLM compression as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API, a reaper and, unless --no-worker, a worker (embedded by "
                                         "default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="embedded data folder (default ./.squeeze, or SQUEEZE_DATA_DIR)")
    serve.add_argument("--no-worker", action="store_true", help="no worker (workers run elsewhere)")
    serve.add_argument("--no-reaper", action="store_true", help="no reaper (`squeeze reaper` runs elsewhere)")
    serve.add_argument("--loglevel", default="INFO")
    serve.set_defaults(fn=cmd_serve)

    worker = sub.add_parser("worker", help="run a Celery worker for the configured broker")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(fn=cmd_worker)

    reaper = sub.add_parser("reaper", help="requeue jobs of dead workers, re-send lost messages, expire uploads, "
                                           "every SQUEEZE_REAPER_INTERVAL_SECONDS until SIGTERM")
    reaper.add_argument("--loglevel", default="INFO")
    reaper.set_defaults(fn=cmd_reaper)

    migrate = sub.add_parser("migrate", help="alembic upgrade of the configured database")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(fn=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys: create (printed once), list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="a new key for a tenant (made when new); prints the key once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--admin", action="store_true", help="the key sees every tenant's jobs and uploads")
    keys_sub.add_parser("list", help="key ids, tenants, admin flag, created and revoked times (never the keys)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (from `keys list`)")
    revoke.add_argument("key_id")
    keys.set_defaults(fn=cmd_keys)

    compress = sub.add_parser("compress", help="compress a model locally, without the service")
    from app.compress_args import add_compress_arguments

    add_compress_arguments(compress)
    compress.set_defaults(fn=cmd_compress)

    from app.remote_cli import add_remote_commands

    add_remote_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
