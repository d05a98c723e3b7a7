"""All configuration, one class: shared by the API and the worker, validated at start.

Every field reads an environment variable with the ``SQUEEZE_`` prefix (``data_dir`` ->
``SQUEEZE_DATA_DIR``). Tests build their own ``Settings(...)`` instead of poking the environment.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQUEEZE_", env_file=None, extra="ignore")

    # Where embedded mode keeps its database file, broker files, uploads and artifacts.
    data_dir: Path = Path(".squeeze")
    # Empty = embedded defaults under data_dir (SQLite file, filesystem broker).
    database_url: str = ""
    broker_url: str = ""
    # Database connections each process keeps open. The API also runs at most this many requests at once in
    # its thread pool (each holds one connection), so under load connections are reused, not opened per burst
    # and closed again; database_max_overflow more may open for the rest (reaper, dispatcher) and then close.
    database_pool_size: int = Field(10, ge=1)
    database_max_overflow: int = Field(5, ge=0)
    # Empty = <data_dir>/artifacts. Local destinations must resolve inside it.
    artifact_root: Path | None = None
    queue_name: str = "squeeze"
    # Memory classes in GiB of device memory (app/jobs/routing.py): each has a queue <queue_name>.<n>gib, a job
    # goes to the smallest class holding its predicted need, a worker consumes every class it holds. Empty = one
    # queue for all jobs. Jobs whose model config cannot be read at submit go to <queue_name> (any worker).
    memory_classes_gib: list[float] = Field(default_factory=list)
    # How long a submit waits for a Hub model's config.json (for its memory class) before routing it to any worker.
    hub_config_timeout_seconds: float = 5.0

    # Local models and calibration files: allowed everywhere in embedded mode by default,
    # otherwise only below these roots.
    allow_local_paths: bool | None = None
    local_roots: list[Path] = Field(default_factory=list)
    hf_token: SecretStr | None = None
    # Fernet key sealing per-job tokens in the database; embedded mode makes one in the data dir.
    secret_key: SecretStr | None = None
    hf_endpoint: str | None = None  # a Hub mirror; None = huggingface_hub's default (HF_ENDPOINT)
    s3_endpoint_url: str | None = None  # S3-compatible store; None = boto3's (AWS_ENDPOINT_URL_S3)

    # Who may call the API. "auto": API keys required in distributed mode; embedded mode runs
    # without them, and then only on a loopback address (`squeeze serve` refuses otherwise).
    auth: Literal["on", "off", "auto"] = "auto"
    # Host header names the API answers to (DNS rebinding); set the public names when serving beyond loopback.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"])
    # A valid API key is remembered this long by each API process (by the key's sha256), so a poller's
    # requests skip the key lookup. A key revoked meanwhile keeps working there until then; 0 = check every time.
    auth_cache_seconds: float = Field(5.0, ge=0)
    # Origins whose pages may call the API (CORS and the cross-site check); empty = same origin only.
    cors_origins: list[str] = Field(default_factory=list)

    # Request and storage limits.
    max_request_bytes: int = 1024**2  # any request body but an upload: 413 above it
    max_upload_bytes: int = 100 * 1024**2  # one calibration upload: 413 above it
    tenant_upload_quota_bytes: int = 1024**3  # all stored uploads of one tenant: 413 above it
    upload_retention_hours: float = 7 * 24.0  # the reaper deletes older uploads
    max_queued_jobs_per_tenant: int = 100  # more queued jobs: 429 with Retry-After
    queued_retry_after_seconds: int = 30

    # Limits checked at submit.
    max_num_samples: int = 4096
    max_seq_len: int = 8192
    max_rank: int = 512
    max_model_bytes: int = 200 * 1024**3

    # Job lifecycle.
    max_attempts: int = 3
    lease_seconds: float = 120.0  # a running job's worker renews its lease every lease_seconds/4
    reaper_interval_seconds: float = 15.0
    redispatch_after_seconds: float = 300.0  # re-send a queued job's message when none started it
    cancel_grace_seconds: float = 60.0  # after this a cancelled job's worker process is killed
    job_soft_time_limit: int = 6 * 3600
    job_time_limit: int = 6 * 3600 + 300
    # A worker whose database goes away retries each write (progress, events, cancel checks, lease,
    # outcome) this long with backoff; past it the job is left to its lease and the reaper.
    db_retry_seconds: float = 60.0
    # Redis connect and command timeout: bounds how long a submit waits on a broker that is down or
    # hung (one publish retry, then the job stays queued and the reaper re-sends it).
    broker_timeout_seconds: float = 5.0

    # Webhooks (app/webhooks). A job's webhook_url must be https and resolve only to public addresses,
    # checked at submit and again before each POST. webhook_allow_private also admits private, loopback
    # and link-local addresses, and plain http to those (receivers on the same host or network, tests).
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(6, ge=1)  # a delivery without a 2xx by then is recorded as failed
    webhook_backoff_seconds: float = 30.0  # retry n waits backoff * 2**(n-1): 30 s, 1 min, 2 min, ...
    webhook_timeout_seconds: float = 10.0  # per POST
    webhook_interval_seconds: float = 2.0  # how often the reaper's sender looks for due deliveries

    # Worker process.
    worker_concurrency: int = 1
    torch_threads: int = 0  # 0 = torch's default
    broker_polling_interval: float = 0.2
    device: str = "auto"  # auto = cuda when available, else cpu
    # Layer checkpoints a retried attempt resumes from (one folder per job, deleted when the job ends);
    # empty = <data_dir>/checkpoints. Workers that take over each other's jobs must share it.
    checkpoint_root: Path | None = None
    checkpoint_layers: bool = True  # False: a retried job starts again from layer 0
    # Refuse, before reading any weight, a job whose minimum memory (worker.memory) does not fit.
    memory_check: bool = True
    # The device memory this worker advertises for routing; None = measured (CUDA total memory, or host memory
    # on the CPU, capped by a cgroup limit).
    worker_memory_gib: float | None = None
    # Stream the model from its safetensors one decoder layer at a time (worker.stream): host memory
    # does not grow with the number of layers; the artifacts are the same bytes as with False (the
    # whole model loaded in memory first).
    stream_layers: bool = True
    # The dtype weights and activations are computed in; "auto" = the checkpoint's own. Gram matrices
    # and decompositions stay fp32/fp64 whatever this is.
    compute_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # Where the calibration activations between decoder layers live (worker.activations): on the compute
    # device, in host memory, or spilled to files in the job's work folder; "auto" = the device when they
    # and one layer's working set fit its free memory, else the host when they fit its available memory
    # with a margin, else the disk. The numbers are the same wherever they live.
    activations: Literal["auto", "device", "host", "disk"] = "auto"
    # s3://bucket/prefix: layer checkpoints are also kept there, so a worker on another machine resumes.
    checkpoint_s3_uri: str | None = None

    @field_validator("memory_classes_gib", mode="after")
    @classmethod
    def _positive_classes(cls, value: list[float]) -> list[float]:
        if any(gib <= 0 for gib in value):
            raise ValueError("memory classes are sizes in GiB above 0")
        return sorted(set(value))

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @cached_property
    def embedded(self) -> bool:
        return not self.database_url or self.database_url.startswith("sqlite")

    @cached_property
    def auth_enabled(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and not self.embedded)

    @cached_property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'squeeze.db'}"

    @cached_property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @cached_property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @cached_property
    def artifacts_dir(self) -> Path:
        return (self.artifact_root or self.data_dir / "artifacts").expanduser().resolve()

    @cached_property
    def checkpoints_dir(self) -> Path:
        return (self.checkpoint_root or self.data_dir / "checkpoints").expanduser().resolve()

    @cached_property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @cached_property
    def local_paths_allowed(self) -> bool:
        return self.embedded if self.allow_local_paths is None else self.allow_local_paths

    def local_path_permitted(self, path: Path) -> bool:
        """A local model or dataset path may be used when local paths are on, or it lies in a root."""
        resolved = path.expanduser().resolve()
        if resolved.is_relative_to(self.uploads_dir.resolve()):
            return True
        if self.local_paths_allowed:
            return True
        return any(resolved.is_relative_to(root.expanduser().resolve()) for root in self.local_roots)
