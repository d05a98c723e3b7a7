"""The read API under load (issue 17): 10,000 jobs in PostgreSQL, 200 concurrent dashboard pollers.

    python -m bench.load [--duration 20] [--pollers 200] [--configs w1 w2] [--baseline DIR] [--out docs/bench/load.json]

A fresh PostgreSQL database (tests/services.py; dropped at the end) is migrated by the project's
migrations and filled with 10,000 jobs of five tenants: mixed statuses, real-looking specs, and for
succeeded jobs the metrics a real job records (per-module errors of every Linear: 15-25 KB each).
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
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import func, insert, select, text

from app.auth import create_key
from app.db.models import Job, JobEvent, JobStatus, Tenant
from app.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade_database
from app.jobs.repository import listed_metrics
from app.main import create_app
from app.settings import Settings
from tests.services import REDIS_URL, free_port, fresh_postgres_database, wait_ready

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "bench" / "load.wrk.lua"
OUT = ROOT / "docs" / "bench" / "load.json"

TENANTS = {"acme": 0.40, "globex": 0.25, "initech": 0.15, "umbrella": 0.12, "hooli": 0.08}  # share of jobs
MODELS = {  # Hub id: decoder layers (7 Linears each)
    "HuggingFaceTB/SmolLM2-135M": 30, "Qwen/Qwen2.5-0.5B": 24, "meta-llama/Llama-3.2-1B": 16,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 22,
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STATUSES = [(JobStatus.succeeded, 0.78), (JobStatus.failed, 0.11), (JobStatus.cancelled, 0.09),
            (JobStatus.running, 0.01), (JobStatus.queued, 0.01)]
LOGGED_JOBS = 1000

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


# --- the data ---------------------------------------------------------------------------------

def job_spec(rng: random.Random, model: str) -> dict:
    method = rng.choice(["gptq", "gptq", "rtn"])
    spec = {"model": {"id": model, "revision": "main"},
            "quantization": {"method": method, "bits": rng.choice([2, 3, 4, 4, 4, 8]), "group_size": 64,
                             "symmetric": False, "damp": 0.01, "act_order": method == "gptq"},
            "sparsity": None, "compensation": None,
            "calibration": {"dataset": "allenai/c4", "split": "train", "text_field": "text", "num_samples": 128,
                            "seq_len": 512, "seed": 0},
            "evaluation": {"dataset": None, "num_windows": 32, "seq_len": None},
            "destination": {"uri": None, "private": True, "create_repo": True}, "webhook_url": None}
    if rng.random() < 0.3:
        spec["sparsity"] = {"method": "sparsegpt", "ratio": None, "pattern": "2:4"}
    if rng.random() < 0.5:
        spec["compensation"] = {"method": rng.choice(["eora", "svd"]), "rank": rng.choice([16, 32, 64]),
                                "rank_budget": None, "adapter_bits": None, "damp": 1.0, "sink_tokens": 0}
    return spec


def job_metrics(rng: random.Random, spec: dict, layers: int, per_module_errors: bool) -> dict:
    """What worker/pipeline.py records for a finished job; per_module_errors False leaves out the
    per-module errors of every Linear (most of the bytes: a what-if for a lighter job list)."""
    rank = (spec["compensation"] or {}).get("rank") or 0
    per_module = {f"model.layers.{i}.{name}": {
        "error_before": round(rng.uniform(0.01, 0.2), 6),
        "error_after": round(rng.uniform(0.005, 0.1), 6) if rank else None,
        "rank": rank, "zero_fraction": 0.5 if spec["sparsity"] else 0.0} for i in range(layers) for name in LINEARS}
    before = rng.uniform(15, 25)
    after = before * rng.uniform(1.02, 1.6)
    adapter_params = rank * 1_000_000 // 64
    return {"perplexity_before": before, "perplexity_after": after, "perplexity_ratio": after / before,
            "layers": layers, "device": "cuda", "model_revision": uuid.uuid4().hex + uuid.uuid4().hex[:8],
            "data": {"calibration_windows": 128, "evaluation_windows": 32, "evaluation_source": "held out"},
            "timings": {"load_s": 4.1, "calibrate_s": 30.2, "compress_s": 300.5, "eval_after_s": 20.3, "total_s": 380.1},
            "compression": {"modules": len(per_module), "mean_relative_error_before": 0.05,
                            "mean_relative_error_after": 0.02 if rank else None, "max_rank": rank,
                            "per_module": per_module if per_module_errors else {}, "adapter_params": adapter_params,
                            "adapter_stored_bytes": 2 * adapter_params, "adapter_served_bytes": 2 * adapter_params,
                            "seconds": {"calibration": 30.2, "compression": 250.1, "compensation": 40.2,
                                        "propagation": 10.2}},
            "adapter": None if not rank else {"params": adapter_params, "stored_bytes": 2 * adapter_params,
                                              "served_bytes": 2 * adapter_params, "stored_bits_per_param": 16.0,
                                              "served_bits_per_param": 16.0},
            "verification": {"max_abs_diff": 1e-5, "atol": 1e-3, "rtol": 1e-3, "windows": 2, "adapter": bool(rank)}}


def job_rows(rng: random.Random, count: int, now: datetime, per_module_errors: bool) -> tuple[list[dict], list[dict]]:
    """(job rows, their events): a "job queued" event for every job, whole logs for LOGGED_JOBS of them."""
    jobs, events = [], []
    tenants, shares = list(TENANTS), list(TENANTS.values())
    statuses, weights = zip(*STATUSES, strict=True)
    for n in range(count):
        model = rng.choice(list(MODELS))
        layers = MODELS[model]
        status = rng.choices(statuses, weights)[0]
        created = now - timedelta(days=60) * (1 - n / count) - timedelta(seconds=rng.random())
        spec = job_spec(rng, model)
        started = created + timedelta(seconds=rng.uniform(1, 600)) if status != JobStatus.queued else None
        finished = started + timedelta(seconds=rng.uniform(60, 3600)) if status.terminal and started else None
        done = layers if status == JobStatus.succeeded else rng.randrange(layers)
        metrics = job_metrics(rng, spec, layers, per_module_errors) if status == JobStatus.succeeded else None
        row = {"id": uuid.uuid4(), "tenant_id": rng.choices(tenants, shares)[0], "status": status, "spec": spec,
               "attempt": 0 if status == JobStatus.queued else 1, "max_attempts": 3,
               "stage": status.value if status != JobStatus.running else "compress",
               "layer": None if status == JobStatus.queued else done, "layers": layers,
               "percent": 100.0 if status == JobStatus.succeeded else (10 + 75 * done / layers if started else 0.0),
               "error": "CUDA out of memory at layer 7 (model.layers.7.mlp.down_proj)" if status == JobStatus.failed
               else None,
               "metrics": metrics, "listed_metrics": listed_metrics(metrics),
               "artifacts": job_artifacts(model, spec) if status == JobStatus.succeeded else None,
               "lease_owner": "gpu-worker-1" if status == JobStatus.running else None,
               "lease_expires_at": now + timedelta(hours=1) if status == JobStatus.running else None,
               "dispatched_at": created, "created_at": created, "updated_at": finished or started or created,
               "started_at": started, "finished_at": finished}
        jobs.append(row)
        events.append({"job_id": row["id"], "attempt": 0, "created_at": created, "stage": "queued",
                       "level": "info", "message": "job queued", "data": None})
        if n % (count // LOGGED_JOBS) == 0 and started:
            events.extend(job_log(rng, row, started, done))
    return jobs, events


def job_artifacts(model: str, spec: dict) -> dict:
    """What a finished job's artifacts column holds: the published files, the export's notes, and squeeze.json's
    serving table (copied into the job since the dashboard shows it), shaped as worker.pipeline writes them."""
    rank = (spec["compensation"] or {}).get("rank")
    files = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "squeeze.json"]
    if rank:
        files += ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    bits = spec["quantization"]["bits"]
    serving = {"transformers": {"loads": True, "quantization_config": "CompressedTensorsConfig(dequantize=True)"},
               "vllm": {"serves": bits in (4, 8), "scheme": f"W{bits}A16 (compressed-tensors pack-quantized)",
                        "lora": {"enable_lora": True, "max_lora_rank": rank} if rank else None},
               "peft": {"loads": True, "adapter": "adapter"} if rank else None}
    notes = ["asymmetric weights: load with quantization_config=CompressedTensorsConfig(dequantize=True) as the model "
             "card shows; a plain AutoModelForCausalLM.from_pretrained(path) fails on the weight_zero_point shapes"]
    return {"uri": f"s3://models/{model.lower()}/", "files": sorted(files), "notes": notes,
            "adapter": "adapter" if rank else None, "manifest": "squeeze.json", "serving": serving}


def job_log(rng: random.Random, job: dict, started: datetime, done: int) -> list[dict]:
    def event(stage: str, message: str, data: dict | None = None) -> dict:
        return {"job_id": job["id"], "attempt": 1, "created_at": started, "stage": stage, "level": "info",
                "message": message, "data": data}

    log_ = [event("loading", "loading the model"), event("calibration", "128 calibration windows of 512 tokens")]
    for i in range(done):
        modules = {f"model.layers.{i}.{name}": {"error_before": round(rng.uniform(0.01, 0.2), 6), "error_after": None,
                                                 "rank": 0, "zero_fraction": 0.0} for name in LINEARS}
        log_.append(event("compress", f"layer {i + 1}/{job['layers']} compress done in 9.81s",
                          {"seconds": 9.81, "modules": modules}))
    if job["status"].terminal:
        log_.append(event(job["status"].value, f"job {job['status'].value}"))
    return log_


def seed(settings: Settings, count: int, per_module_errors: bool) -> dict:
    """Fill the database; returns the wrk targets: per tenant an API key, job ids, logged jobs' last event ids."""
    rng = random.Random(0)
    engine = make_engine(settings)
    try:
        jobs, events = job_rows(rng, count, datetime.now(UTC), per_module_errors)
        with unit_of_work(make_sessionmaker(engine)) as session:
            session.execute(insert(Tenant), [{"id": t, "created_at": datetime.now(UTC)} for t in TENANTS])
            session.execute(insert(Job), jobs)
            session.execute(insert(JobEvent), events)
            keys = {t: create_key(session, t) for t in TENANTS}
        with unit_of_work(make_sessionmaker(engine)) as session:
            session.execute(text("ANALYZE"))
            last_events = session.execute(
                select(Job.tenant_id, JobEvent.job_id, func.max(JobEvent.id)).join(Job, Job.id == JobEvent.job_id)
                .group_by(Job.tenant_id, JobEvent.job_id).having(func.count() > 1)).all()
            sizes = dict(session.execute(text(
                "SELECT 'jobs', pg_total_relation_size('jobs') UNION ALL "
                "SELECT 'job_events', pg_total_relation_size('job_events')")).all())
            plan = session.execute(text(
                "EXPLAIN SELECT * FROM jobs WHERE tenant_id = 'acme' ORDER BY created_at DESC, id DESC LIMIT 51"
            )).scalars().all()
    finally:
        engine.dispose()
    targets = [{"name": t, "key": keys[t], "jobs": [str(j["id"]) for j in jobs if j["tenant_id"] == t],
                "logged": [[str(job_id), last] for tenant, job_id, last in last_events if tenant == t]}
               for t in TENANTS]
    return {"targets": targets, "jobs": len(jobs), "events": len(events), "bytes": sizes, "list_plan": plan}


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
