"""bench.load's data: 10,000 synthetic jobs of five tenants written into a fresh database (seed), with
mixed statuses, real-looking specs, the metrics a finished job records, its artifacts and, for
LOGGED_JOBS of them, a whole event log."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select, text

from app.auth import create_key
from app.db.models import Job, JobEvent, JobStatus, Tenant
from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.jobs.repository import listed_metrics
from app.settings import Settings

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
