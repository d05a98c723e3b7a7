"""The read API under load (issue 17): 10,000 jobs in PostgreSQL, 200 concurrent dashboard pollers.

    python -m bench.load [--duration 20] [--pollers 200] [--configs w1 w2] [--baseline DIR] [--out docs/bench/load.json]

A fresh PostgreSQL database (tests/services.py; dropped at the end) is migrated by the project's
migrations and filled with 10,000 jobs of five tenants (bench.load_data): mixed statuses, real-looking
specs, and for succeeded jobs the metrics a real job records (per-module errors of every Linear: 15-25 KB
each).
Every job has its "job queued" event; 1,000 have a whole event log (one event per layer).

The API runs in its own process (uvicorn, as `squeeze serve --no-worker` does, with API keys on and
no worker or reaper: only the read path is measured). The load comes from `wrk` (Debian's package,
`apt-get install wrk`) with bench/load.wrk.lua: each of the `--pollers` connections is one poller
with its tenant's API key, cycling through GET /v1/jobs?limit=50, its next page by cursor,
GET /v1/jobs/{id} and GET /v1/jobs/{id}/events?after=<a recent event>. Two shapes per server
configuration: "poll" (each poller waits 0.5-1.5 s before each request, about the dashboard's fastest
rhythm) and "saturate" (no wait: the server's capacity, whose latency is the queue 200 clients make).
With --baseline DIR (another checkout, e.g. `git worktree add --detach DIR <commit>`), that checkout's
server takes the same loads against the same database, each shape run on both servers in turn: a
before/after on the same data and the same (shared) cores. Writes one JSON file with provenance
(bench/common.py's) and every run's rps, latency, errors and the server's CPU time per request (its
processes' user + system time over the run: less sensitive than rps to what else runs on the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from app.db.session import upgrade_database
from app.main import create_app
from app.settings import Settings
from bench.load_data import STATUSES, TENANTS, seed
from tests.services import REDIS_URL, free_port, fresh_postgres_database, wait_ready

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "bench" / "load.wrk.lua"
OUT = ROOT / "docs" / "bench" / "load.json"


# Server configurations: uvicorn worker processes, access log. The database pool is each checkout's
# Settings default (this one's is in the report; before 488888d it was SQLAlchemy's 5 + 10 overflow).
CONFIGS = {
    "w1": {"workers": 1, "access_log": True},
    "w2": {"workers": 2, "access_log": True},
    "w2_quiet": {"workers": 2, "access_log": False},
}
SHAPES = {"poll": 1000, "saturate": 0}  # LOAD_DELAY_MS: mean wait before each request


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lua_table(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {lua_table(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_table(v) for v in value) + "}"
    return json.dumps(value)  # strings and numbers are spelled alike


# --- the server and the load ------------------------------------------------------------------

def api():
    """The uvicorn factory: the app `squeeze serve --no-worker` runs (its reaper is a process of its own there)."""
    return create_app(Settings(), run_reaper=False)


class Server:
    def __init__(self, settings: Settings, config: dict, log_path: Path, root: Path = ROOT):
        """root: the checkout whose code serves (another one for --baseline)."""
        self.port = free_port()
        env = {**os.environ, "SQUEEZE_DATABASE_URL": settings.database_url, "SQUEEZE_BROKER_URL": REDIS_URL,
               "SQUEEZE_DATA_DIR": str(settings.data_dir), "SQUEEZE_AUTH": "on", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "uvicorn", "bench.load:api", "--factory", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(config["workers"]), "--log-level", "info"]
        if not config["access_log"]:
            command.append("--no-access-log")
        self.log = log_path.open("w")
        env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen(command, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_ready(self.base, self.proc, log_path)
        except RuntimeError:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and its worker processes so far."""
        pids = [self.proc.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                                                                  capture_output=True, text=True).stdout.split()]
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def single_requests(base: str, targets: list[dict], repeats: int = 10) -> dict:
    """One client, one request at a time: each endpoint's latency without queueing, and its size."""
    tenant = targets[0]
    headers = {"Authorization": f"Bearer {tenant['key']}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        first = client.get("/v1/jobs?limit=50").json()
        logged = tenant["logged"][0]
        paths = {"list": "/v1/jobs?limit=50", "list_next": f"/v1/jobs?limit=50&cursor={first['next_cursor']}",
                 "job": f"/v1/jobs/{tenant['jobs'][0]}", "events": f"/v1/jobs/{logged[0]}/events?after={logged[1] - 2}"}
        out = {}
        for kind, path in paths.items():
            times, size = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                response = client.get(path)
                times.append(time.perf_counter() - t0)
                assert response.status_code == 200, (path, response.status_code, response.text[:200])
                size = len(response.content)
            times.sort()
            out[kind] = {"median_ms": round(1000 * times[len(times) // 2], 1), "bytes": size}
    return out


def run_wrk(base: str, targets_file: Path, pollers: int, duration: int, delay_ms: int, threads: int,
            result_file: Path) -> dict:
    env = {**os.environ, "LOAD_TARGETS": str(targets_file), "LOAD_DELAY_MS": str(delay_ms),
           "LOAD_RESULT": str(result_file)}
    subprocess.run(["wrk", f"-t{threads}", f"-c{pollers}", f"-d{duration}s", "--timeout", "5s",
                    "-s", str(WRK_SCRIPT), base], env=env, check=True, capture_output=True, text=True)
    raw = json.loads(result_file.read_text())
    lat = raw["latency_us"]
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors"]
    return {"requests": raw["requests"], "seconds": round(seconds, 2), "rps": round(raw["requests"] / seconds, 1),
            "p50_ms": round(lat["p50"] / 1000, 1), "p90_ms": round(lat["p90"] / 1000, 1),
            "p99_ms": round(lat["p99"] / 1000, 1), "max_ms": round(lat["max"] / 1000, 1),
            "non_2xx": errors["status"], "timeouts": errors["timeout"],
            "socket_errors": errors["connect"] + errors["read"] + errors["write"],
            "statuses": raw["statuses"], "mb_per_s": round(raw["bytes"] / seconds / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--duration", type=int, default=20, help="seconds per run")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["w1", "w2"])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git worktree add --detach DIR "
                        "COMMIT`) whose server takes the same loads against the same database, in turn with this one's")
    parser.add_argument("--no-per-module-errors", action="store_true",
                        help="what-if: succeeded jobs' metrics without compression.per_module")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.load needs wrk: apt-get install -y wrk")
    from bench.common import provenance

    started, load_at_start = time.monotonic(), os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres_database() as url:
        folder = Path(tmp)
        settings = Settings(database_url=url, broker_url=REDIS_URL, data_dir=folder / "data", auth="on")
        upgrade_database(settings)
        t0 = time.monotonic()
        data = seed(settings, args.jobs, not args.no_per_module_errors)
        seed_seconds = time.monotonic() - t0
        log(f"seeded {data['jobs']} jobs, {data['events']} events in {seed_seconds:.1f} s ({data['bytes']})")
        targets_file = folder / "targets.lua"
        targets_file.write_text("return " + lua_table(data["targets"]) + "\n")
        trees = {"baseline": args.baseline, "change": ROOT} if args.baseline else {"change": ROOT}
        single = {}
        for name in args.configs:
            config = CONFIGS[name]
            servers = {}
            try:
                for tree, root in trees.items():  # both up at once (idle until loaded), loaded in turn
                    servers[tree] = Server(settings, config, folder / f"server-{name}-{tree}.log", root)
                    if tree not in single:
                        single[tree] = single_requests(servers[tree].base, data["targets"])
                        log(f"{tree}: one request at a time: {single[tree]}")
                for shape in args.shapes:
                    for tree, server in servers.items():
                        cpu = server.cpu_seconds()
                        result = run_wrk(server.base, targets_file, args.pollers, args.duration, SHAPES[shape],
                                         args.threads, folder / "wrk.json")
                        cpu = server.cpu_seconds() - cpu
                        result |= {"server_cpu_s": round(cpu, 2),
                                   "server_cpu_ms_per_request": round(1000 * cpu / max(result["requests"], 1), 2)}
                        runs.append({"tree": tree, "config": name, **config, "shape": shape,
                                     "poll_interval_ms": SHAPES[shape] or None, "pollers": args.pollers, **result})
                        log(f"{tree} {name} {shape}: {result}")
            finally:
                for server in servers.values():
                    server.stop()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    report = {
        "benchmark": "bench/load.py", "command": "python -m bench.load " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"), **provenance(),
        "machine": machine_load(load_at_start),
        "server": {"how": "uvicorn bench.load:api --factory (create_app as `squeeze serve --no-worker`, no reaper), "
                          "distributed mode, API keys on, PostgreSQL + Redis on the same machine",
                   "uvicorn": _version("uvicorn"), "sqlalchemy": _version("sqlalchemy"),
                   "pool": f"{settings.database_pool_size} + {settings.database_max_overflow} overflow per process "
                           "(this checkout's Settings)"},
        "load": {"tool": wrk_version, "script": "bench/load.wrk.lua", "threads": args.threads, "pollers": args.pollers,
                 "duration_s": args.duration, "timeout_s": 5,
                 "mix": "per cycle: GET /v1/jobs?limit=50, its next page by cursor, GET /v1/jobs/{id}, "
                        "GET /v1/jobs/{id}/events?after=<0-3 events back>; tenants and jobs at random"},
        "data": {"jobs": data["jobs"], "events": data["events"], "per_module_errors": not args.no_per_module_errors,
                 "tenants": TENANTS, "statuses": {s.value: w for s, w in STATUSES}, "table_bytes": data["bytes"],
                 "seed_seconds": round(seed_seconds, 1), "list_query_plan": data["list_plan"]},
        "baseline": {"root": str(args.baseline), "commit": _commit(args.baseline)} if args.baseline else None,
        "single_client": single, "runs": runs, "total_seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")


def machine_load(load_at_start: tuple[float, float, float]) -> dict:
    """The machine as the run found and left it: load averages read from the kernel, not asserted."""
    cores = os.cpu_count() or 1
    busy = load_at_start[0] > 0.25 * cores
    return {"cpu_count": cores, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
            "busy_at_start": busy,
            "note": (f"other work held the cores when the run started (1-min load {load_at_start[0]:.2f} on "
                     f"{cores} cores)") if busy else "cores idle when the run started"}


def _commit(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
