"""Real services for integration tests: a fresh PostgreSQL database per use, Redis, a Celery worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import redis

PG_ADMIN = os.environ.get("SQUEEZE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SQUEEZE_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def migrated_database(tmp_path, **settings):
    """(Settings, sessionmaker) on a fresh database built by the migrations, with a queue name of its own on
    Redis; the queue and its memory-class queues (<queue>.<n>gib) are deleted afterwards."""
    from app.db.session import make_engine, make_sessionmaker, upgrade_database
    from app.settings import Settings

    with fresh_postgres_database() as url:
        config = Settings(data_dir=tmp_path / "data", database_url=url, broker_url=REDIS_URL,
                          queue_name=f"squeeze-test-{uuid.uuid4().hex[:8]}", **settings)
        upgrade_database(config)
        engine = make_engine(config)
        try:
            yield config, make_sessionmaker(engine)
        finally:
            engine.dispose()
            client = redis.Redis.from_url(REDIS_URL)
            client.delete(config.queue_name, *client.scan_iter(f"{config.queue_name}.*"))


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new empty database, dropped afterwards. Yields its SQLAlchemy URL."""
    name = f"squeeze_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The local servers .ci/run starts, which outage tests stop and start again.
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_SERVER = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
                "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


def local_servers_controllable() -> bool:
    """Whether the tests use the local Redis and PostgreSQL cluster and may stop and start them."""
    return (REDIS_URL == LOCAL_REDIS and PG_ADMIN == LOCAL_PG_ADMIN and shutil.which("redis-server") is not None
            and shutil.which("pg_ctlcluster") is not None and len(os.listdir("/etc/postgresql")) == 1)


def _wait_until(command: list[str], expect: str, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while expect not in subprocess.run(command, capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come back within {timeout:g} s")
        time.sleep(0.05)


@contextmanager
def redis_stopped() -> Iterator[None]:
    """The local Redis is down for the body (its data is lost, as when a server without persistence
    restarts), and up and answering afterwards whatever happens. Other users of the server see the
    outage too: keep the body short."""
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    try:
        yield
    finally:
        os.makedirs("/var/lib/redis", exist_ok=True)
        os.makedirs("/var/log/redis", exist_ok=True)
        subprocess.run(REDIS_SERVER, check=True, capture_output=True)
        _wait_until(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"], "PONG", "redis")


@contextmanager
def postgres_stopped() -> Iterator[None]:
    """The local PostgreSQL cluster is down for the body (a fast shutdown: open sessions are ended, as
    in a restart or failover), and accepting connections afterwards whatever happens. Keep it short."""
    version = os.listdir("/etc/postgresql")[0]
    control = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*control, "stop"], check=True, capture_output=True)  # fast mode, the default
    try:
        yield
    finally:
        subprocess.run([*control, "start"], check=True, capture_output=True)
        _wait_until(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], "accepting connections", "postgresql")


def settings_env(settings) -> dict[str, str]:
    """The environment that makes a child process build the same Settings."""
    env = {
        "SQUEEZE_DATA_DIR": str(settings.data_dir),
        "SQUEEZE_QUEUE_NAME": settings.queue_name,
        "SQUEEZE_LEASE_SECONDS": str(settings.lease_seconds),
        "SQUEEZE_CANCEL_GRACE_SECONDS": str(settings.cancel_grace_seconds),
        "SQUEEZE_TORCH_THREADS": "1",  # the test process and the worker share 2 cores
        "SQUEEZE_BROKER_POLLING_INTERVAL": "0.1",
        "SQUEEZE_AUTH": settings.auth,
        # The Hub cannot be reached from test machines: point it at a closed loopback port so the
        # real download code fails at once instead of waiting on DNS.
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    if settings.local_roots:
        env["SQUEEZE_LOCAL_ROOTS"] = json.dumps([str(root) for root in settings.local_roots])
    if settings.database_url:
        env["SQUEEZE_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["SQUEEZE_BROKER_URL"] = settings.broker_url
    return env


@contextmanager
def celery_worker(settings, log_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`squeeze worker` in its own process, as in production. extra_env: more variables for it, e.g.
    tests.faults.fault_env(...)."""
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel", "INFO"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "ready." not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def create_api_key(settings, tenant: str = "tenant-a", admin: bool = False) -> str:
    """A new API key for the tenant (made when new), straight in the settings' database, which must
    already be migrated (an embedded app migrates on start; distributed tests call upgrade_database)."""
    from app.auth import create_key
    from app.db.session import make_engine, make_sessionmaker, unit_of_work

    engine = make_engine(settings)
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            return create_key(session, tenant, admin=admin)
    finally:
        engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, seconds: float = 60) -> None:
    """Until the server at base answers /readyz with 200; RuntimeError with its log if it exits or
    takes longer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def api_server(settings, log_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`squeeze serve` (with `args`, e.g. --no-worker) in its own process on a free loopback port; yields
    its base URL once /readyz answers."""
    port = free_port()
    full_env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
                                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log_path)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def artifact_dir(settings, job: dict) -> Path:
    """The folder of a finished job's local artifact: its URI names it below the artifact root."""
    from worker.storage import local_artifact_path

    return local_artifact_path(job["artifacts"]["uri"], settings.artifacts_dir)


class Receiver:
    """An HTTP server on loopback answering each POST with the next of `codes` (the last one repeats)."""

    def __init__(self, codes: list[int]):
        self.codes, self.requests = list(codes), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                code = receiver.codes.pop(0) if len(receiver.codes) > 1 else receiver.codes[0]
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/squeeze?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[dict, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} webhook requests arrived"
            time.sleep(0.02)
        return self.requests

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def verified(secret: str, headers: dict, body: bytes) -> dict:
    """The webhook body, parsed, once its X-Squeeze-Signature proved right for the secret."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Squeeze-Signature"], expected)
    return json.loads(body)
