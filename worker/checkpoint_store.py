"""Layer checkpoints in S3-compatible storage, for workers that share no disk.

worker.resume keeps a job's checkpoints in a local folder; with Settings.checkpoint_s3_uri set, every
committed file is also put under <uri>/<job id>/attempt-<a>/ (state.json last, so a reader that sees
a state finds every file it names), and an attempt on another machine that has no local state
downloads the newest earlier attempt's. No torch here: the job runner deletes a finished job's
prefix without importing the compression stack.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

ATTEMPT_PREFIX = "attempt-"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"checkpoint_s3_uri must look like s3://bucket/prefix, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


class S3CheckpointStore:
    """One job's checkpoint files in a bucket: put, delete, list attempts, fetch, clear."""

    def __init__(self, uri: str, job_id: str, *, client=None, endpoint_url: str | None = None):
        import boto3

        self.bucket, prefix = parse_s3_uri(uri)
        self.base = f"{prefix}/{job_id}/" if prefix else f"{job_id}/"
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def key(self, attempt: int, name: str) -> str:
        return f"{self.base}{ATTEMPT_PREFIX}{attempt}/{name}"

    def put(self, attempt: int, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(attempt, path.name))

    def delete(self, attempt: int, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self.key(attempt, name)} for name in names[start:start + 1000]], "Quiet": True})

    def attempts(self) -> list[int]:
        """The attempts that stored anything, newest first."""
        found = set()
        for key in self._keys():
            part = key[len(self.base):].split("/", 1)[0]
            if part.startswith(ATTEMPT_PREFIX) and part[len(ATTEMPT_PREFIX):].isdigit():
                found.add(int(part[len(ATTEMPT_PREFIX):]))
        return sorted(found, reverse=True)

    def fetch(self, attempt: int, name: str, folder: Path) -> bool:
        """Download one file of an attempt into folder; False when it is not there."""
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self.key(attempt, name), str(folder / name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def clear(self, keep: int | None = None) -> None:
        """Delete every attempt's files but `keep`'s (None: the job's whole prefix)."""
        keep_prefix = None if keep is None else f"{self.base}{ATTEMPT_PREFIX}{keep}/"
        debris = [k for k in self._keys() if keep_prefix is None or not k.startswith(keep_prefix)]
        for start in range(0, len(debris), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in debris[start:start + 1000]], "Quiet": True})

    def _keys(self) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.base):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys


def discard_job_checkpoints(uri: str | None, job_id: str, endpoint_url: str | None) -> None:
    """Best effort: the job ended, nothing resumes from its stored checkpoints."""
    if not uri:
        return
    try:
        S3CheckpointStore(uri, job_id, endpoint_url=endpoint_url).clear()
    except Exception as exc:  # never fail a finished job over its leftovers; they are logged
        log.warning("could not delete the checkpoints of job %s under %s: %s", job_id, uri, exc)
