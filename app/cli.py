"""`squeeze serve | worker | migrate | compress`."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.settings import Settings


def _worker_argv(settings: Settings, loglevel: str) -> list[str]:
    return [
        "worker", f"--loglevel={loglevel}", "-Q", settings.queue_name,
        f"--concurrency={settings.worker_concurrency}", "--pool=prefork", f"--hostname=squeeze-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.tasks import app, settings

    app.worker_main(_worker_argv(settings, args.loglevel))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db.session import upgrade_database

    upgrade_database(Settings(), args.revision)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db.session import upgrade_database
    from app.main import create_app

    if args.data_dir:
        os.environ["SQUEEZE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = Settings()
    upgrade_database(settings)
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel", args.loglevel],
                                  env=os.environ.copy())
    print(f"squeeze: API on http://{args.host}:{args.port} (docs at /docs), data in {settings.data_dir}, "
          f"database {'SQLite' if settings.embedded else 'external'}, broker {settings.celery_broker_url.split('://')[0]}",
          flush=True)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.loglevel.lower())
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from worker.cli_compress import main as compress_main

    return compress_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeeze", description="LLM compression as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API and, unless --no-worker, a worker (embedded by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="embedded data folder (default ./.squeeze, or SQUEEZE_DATA_DIR)")
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    serve.add_argument("--loglevel", default="INFO")
    serve.set_defaults(fn=cmd_serve)

    worker = sub.add_parser("worker", help="run a Celery worker for the configured broker")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(fn=cmd_worker)

    migrate = sub.add_parser("migrate", help="alembic upgrade of the configured database")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(fn=cmd_migrate)

    compress = sub.add_parser("compress", help="compress a model locally, without the service")
    from app.compress_args import add_compress_arguments

    add_compress_arguments(compress)
    compress.set_defaults(fn=cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
