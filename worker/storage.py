"""Destinations: where a finished, verified artifact folder goes. One interface, chosen by URI scheme.

    local folder      /abs/path, relative/path, file://...   (no URI: <artifacts_dir>/<job_id>)
    S3-compatible     s3://bucket[/prefix]                    -> s3://bucket/prefix/<job_id>/
    Hugging Face Hub  hf://org/repo or hub://org/repo         -> one commit on the repo's main branch

Every destination makes a retried job (same job id, next attempt) end with exactly one complete
artifact, never a half-written or duplicated one:

- Local: the target is `<artifact root>/<job id>`, or a new folder below the root that the job
  names (app.jobs.destinations: the rules are checked again here, the stored spec may predate
  them). The files are staged (hard links, else copies) in a hidden sibling folder
  `.<name>.staging-<job>-<attempt>` with an owner marker naming the job and, only while the
  database says this attempt still owns the job (`still_owns`), renamed into place in one step
  (a rename that refuses a non-empty folder that appeared meanwhile). A target that exists is
  replaced only when its owner marker names this same job (an earlier attempt published it);
  anything else fails the job without touching it. Nothing is deleted that this job did not make.
- S3 (no rename in S3): files go straight to their final keys under `<prefix>/<job_id>/`, and a
  completion marker `_SUCCESS` is written LAST. Readers trust a prefix only when `_SUCCESS` is
  there; it lists every file with its size and sha256. A publish first withdraws any marker (an
  earlier attempt's), aborts multipart uploads an interrupted attempt left open under the prefix,
  uploads (multipart above a threshold), deletes keys under the job's own prefix that are not part
  of the new file set (leftovers of earlier attempts; never a key outside `<prefix>/<job_id>/`),
  checks that every key carries the sha256 of this attempt's file (so a concurrent stale attempt
  cannot be sealed by our marker), and writes the marker only while this attempt owns the job.
- Hub: one commit carries every file (a commit is atomic). Files that the repo's previous
  Squeeze manifest listed and the new artifact lacks are deleted in the same commit; other files in
  the repo are left alone. The commit is made against the head read before it (parent_commit), so
  a concurrent commit makes ours fail instead of mixing; it is made only while this attempt owns
  the job. The returned URI pins the commit SHA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from app.jobs.destinations import (
    LOCAL_RULE,
    OWNER_MARKER,
    DestinationRefused,
    hub_repo,
    local_target,
    owner_of,
    s3_location,
    scheme_of,
)
from worker.errors import JobFailure, LostOwnership

log = logging.getLogger(__name__)

S3_MARKER = "_SUCCESS"
MANIFEST_NAME = "squeeze.json"  # written by worker.export; the Hub destination reads the previous one
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024**2
DEFAULT_MULTIPART_CHUNKSIZE = 64 * 1024**2
SHA256_METADATA = "sha256"  # S3 object metadata key (x-amz-meta-sha256)


class DestinationError(JobFailure):
    """Publishing failed; the message is for the user (no secrets in it)."""


@dataclass(frozen=True)
class PublishedArtifact:
    uri: str  # where readers find it (for the Hub, pinned to the commit)
    files: list[str]  # relative posix paths, sorted (the S3 marker not included)


def _always_ours() -> bool:
    return True


class Destination(Protocol):
    def publish(self, local_dir: Path, job_id: str, attempt: int,
                still_owns: Callable[[], bool] = _always_ours) -> PublishedArtifact:
        """still_owns() is asked right before the artifact becomes visible; False stops the publish."""


@dataclass(frozen=True)
class DestinationOptions:
    """Per-job destination settings from the job spec."""

    private: bool = True  # Hub: a new repo is private unless the job says otherwise
    create_repo: bool = True  # Hub: create the repo when it does not exist
    token: SecretStr | None = field(default=None, repr=False)  # Hub: the job's token (else the server's)


def destination_for(uri: str | None, *, artifacts_dir: Path, options: DestinationOptions = DestinationOptions(),
                    s3_endpoint_url: str | None = None, hf_endpoint: str | None = None,
                    hf_token: SecretStr | None = None) -> Destination:
    """The destination for a job's destination.uri. s3_endpoint_url None lets boto3 read
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or use AWS); hf_token is the server's fallback token."""
    try:
        scheme = scheme_of(uri)
        if scheme == "local":  # its rules are checked by target(job_id), which knows whose folder is whose
            return LocalDestination(artifacts_dir, uri)
        if scheme == "s3":
            bucket, prefix = s3_location(uri)
            return S3Destination(bucket, prefix, endpoint_url=s3_endpoint_url)
        if scheme in ("hf", "hub"):
            return HubDestination(hub_repo(uri), token=options.token or hf_token, private=options.private,
                                  create_repo=options.create_repo, endpoint=hf_endpoint)
    except DestinationRefused as exc:
        raise DestinationError(f"destination.uri: {exc}") from None
    raise DestinationError(f"destination.uri: unknown scheme {scheme!r} (use a folder, s3:// or hf://)")


def artifact_files(local_dir: Path) -> dict[str, Path]:
    """{relative posix path: path} of every file under local_dir, sorted."""
    if not local_dir.is_dir():
        raise DestinationError(f"nothing to publish: {local_dir} is not a folder")
    return dict(sorted((p.relative_to(local_dir).as_posix(), p) for p in local_dir.rglob("*") if p.is_file()))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


LOCAL_URI_PREFIX = "local:"  # a local artifact's URI names its folder below the artifact root, never a server path


def local_artifact_path(uri: str, artifacts_dir: Path) -> Path:
    """The folder a `local:<relative>` artifact URI names, on the server that published it."""
    if not uri.startswith(LOCAL_URI_PREFIX):
        raise ValueError(f"not a local artifact URI: {uri!r}")
    return Path(artifacts_dir).resolve() / uri.removeprefix(LOCAL_URI_PREFIX)


class LocalDestination:
    """A folder below the artifact root: `<root>/<job id>` when uri is None."""

    def __init__(self, artifacts_dir: Path, uri: str | None = None):
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.uri = uri

    def target(self, job_id: str) -> Path:
        try:
            return local_target(self.uri, self.artifacts_dir, job_id=job_id)
        except DestinationRefused as exc:
            raise DestinationError(f"destination.uri: {exc}") from None

    def publish(self, local_dir: Path, job_id: str, attempt: int,
                still_owns: Callable[[], bool] = _always_ours) -> PublishedArtifact:
        files = artifact_files(local_dir)
        target = self.target(job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.staging-{job_id}-*"):  # this job's own, of a dead attempt
            shutil.rmtree(leftover)
        staging = target.with_name(f".{target.name}.staging-{job_id}-{attempt}")
        for relative, path in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, staging / relative)
        (staging / OWNER_MARKER).write_text(json.dumps({"job_id": job_id, "attempt": attempt}) + "\n")
        try:
            self._switch(staging, target, job_id, attempt, still_owns)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless the switch did not happen
        return PublishedArtifact(uri=LOCAL_URI_PREFIX + target.relative_to(self.artifacts_dir).as_posix(),
                                 files=list(files))

    def _switch(self, staging: Path, target: Path, job_id: str, attempt: int, still_owns) -> None:
        if owner_of(target) == job_id:  # an earlier attempt of this job published here and died before recording it
            self._replace_own(staging, target, job_id, attempt, still_owns)
            return
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise DestinationError(f"destination.uri: {LOCAL_RULE}")
        if not still_owns():
            raise LostOwnership(f"job {job_id} attempt {attempt} lost the job before publishing")
        try:  # atomic; refuses a non-empty folder that appeared since the check (POSIX: ENOTEMPTY/EEXIST)
            staging.rename(target)
        except OSError:
            raise DestinationError(f"destination.uri: {LOCAL_RULE}") from None

    def _replace_own(self, staging: Path, target: Path, job_id: str, attempt: int, still_owns) -> None:
        previous = target.with_name(f".{target.name}.previous-{job_id}-{attempt}")
        if not still_owns():
            raise LostOwnership(f"job {job_id} attempt {attempt} lost the job before publishing")
        target.rename(previous)
        staging.rename(target)
        if owner_of(previous) == job_id:
            shutil.rmtree(previous)


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link costs nothing for multi-GB shards; across filesystems, copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


class S3Destination:
    def __init__(self, bucket: str, prefix: str = "", *, client=None, endpoint_url: str | None = None,
                 transfer_config=None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        self.transfer_config = transfer_config or TransferConfig(multipart_threshold=DEFAULT_MULTIPART_THRESHOLD,
                                                                 multipart_chunksize=DEFAULT_MULTIPART_CHUNKSIZE)

    def job_prefix(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/" if self.prefix else f"{job_id}/"

    def publish(self, local_dir: Path, job_id: str, attempt: int,
                still_owns: Callable[[], bool] = _always_ours) -> PublishedArtifact:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        files = artifact_files(local_dir)
        if S3_MARKER in files:
            raise DestinationError(f"the artifact may not contain a file named {S3_MARKER} (the completion marker)")
        base = self.job_prefix(job_id)
        try:
            checksums = {relative: sha256_file(path) for relative, path in files.items()}
            self.client.delete_object(Bucket=self.bucket, Key=base + S3_MARKER)  # not complete while we write
            self._abort_multipart_uploads(base)
            for relative, path in files.items():
                self.client.upload_file(str(path), self.bucket, base + relative, Config=self.transfer_config,
                                        ExtraArgs={"Metadata": {SHA256_METADATA: checksums[relative]}})
            stale = [key for key in self._keys(base) if key.startswith(base) and key[len(base):] not in files]
            for start in range(0, len(stale), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in stale[start:start + 1000]], "Quiet": True})
            self._check_uploaded(base, checksums)
            if not still_owns():
                raise LostOwnership(f"job {job_id} attempt {attempt} lost the job before sealing its S3 artifact")
            marker = {"job_id": job_id, "attempt": attempt, "files": {
                relative: {"bytes": path.stat().st_size, "sha256": checksums[relative]}
                for relative, path in files.items()}}
            self.client.put_object(Bucket=self.bucket, Key=base + S3_MARKER, ContentType="application/json",
                                   Body=json.dumps(marker, indent=2).encode())
        except DestinationError:
            self._discard_partial(base, still_owns)
            raise
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            self._discard_partial(base, still_owns)
            raise DestinationError(f"upload to s3://{self.bucket}/{base} failed: {exc}") from exc
        log.info("published %d files to s3://%s/%s (attempt %d)", len(files), self.bucket, base, attempt)
        return PublishedArtifact(uri=f"s3://{self.bucket}/{base}", files=list(files))

    def completed(self, job_id: str) -> dict | None:
        """The completion marker of a job's artifact (files, sizes, sha256), or None if incomplete."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.job_prefix(job_id) + S3_MARKER)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body.read())

    def _discard_partial(self, base: str, still_owns: Callable[[], bool]) -> None:
        """After a failed upload: no partial prefix (objects or open multipart uploads) is left behind,
        unless another attempt owns the job now (its upload is its own). Best effort: a store that
        cannot be reached leaves the debris for a retry, and the unsealed prefix is never trusted."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if not still_owns():
                return
            self._abort_multipart_uploads(base)
            debris = [key for key in self._keys(base) if key.startswith(base)]
            for start in range(0, len(debris), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in debris[start:start + 1000]], "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not remove the partial upload under s3://%s/%s: %s", self.bucket, base, exc)

    def _keys(self, base: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _abort_multipart_uploads(self, base: str) -> None:
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def _check_uploaded(self, base: str, checksums: dict[str, str]) -> None:
        for relative, digest in checksums.items():
            head = self.client.head_object(Bucket=self.bucket, Key=base + relative)
            if head.get("Metadata", {}).get(SHA256_METADATA) != digest:
                raise DestinationError(f"s3://{self.bucket}/{base}{relative} changed during the upload (another "
                                       "attempt of this job is writing); not marking the artifact complete")


class HubDestination:
    def __init__(self, repo_id: str, *, token: SecretStr | None = None, private: bool = True,
                 create_repo: bool = True, endpoint: str | None = None, branch: str = "main"):
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.create_repo = create_repo
        self.endpoint = endpoint
        self.branch = branch

    def __repr__(self) -> str:  # never the token
        return f"HubDestination({self.repo_id!r}, private={self.private}, create_repo={self.create_repo})"

    def publish(self, local_dir: Path, job_id: str, attempt: int,
                still_owns: Callable[[], bool] = _always_ours) -> PublishedArtifact:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        files = artifact_files(local_dir)
        api = HfApi(endpoint=self.endpoint, token=self.token.get_secret_value() if self.token else False)
        try:
            if self.create_repo:
                api.create_repo(self.repo_id, repo_type="model", private=self.private, exist_ok=True)
            try:
                head = api.model_info(self.repo_id, revision=self.branch)
            except RepositoryNotFoundError:
                raise DestinationError(f"Hub repo {self.repo_id!r} does not exist (or the token cannot see it) and "
                                       "create_repo is off") from None
            if self.private and not head.private:
                raise DestinationError(f"Hub repo {self.repo_id!r} exists and is public; this job asked for a private "
                                       "artifact, so nothing was uploaded")
            stale = sorted(self._previous_files(api, head.sha) - set(files))
            operations = [CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path))
                          for relative, path in files.items()]
            operations += [CommitOperationDelete(path_in_repo=relative) for relative in stale]
            if not still_owns():
                raise LostOwnership(f"job {job_id} attempt {attempt} lost the job before its Hub commit")
            commit = api.create_commit(self.repo_id, operations, revision=self.branch, parent_commit=head.sha,
                                       commit_message=f"Squeeze job {job_id} (attempt {attempt})")
        except (DestinationError, LostOwnership):
            raise
        except Exception as exc:  # HTTP errors, connection errors: the message names neither headers nor token
            raise DestinationError(f"upload to the Hugging Face Hub repo {self.repo_id!r} failed: "
                                   f"{exc.__class__.__name__}: {_first_line(exc)}") from None
        log.info("published %d files to hf://%s@%s (attempt %d)", len(files), self.repo_id, commit.oid, attempt)
        return PublishedArtifact(uri=f"hf://{self.repo_id}@{commit.oid}", files=list(files))

    def _previous_files(self, api, revision: str) -> set[str]:
        """Files the repo's current squeeze.json lists (an earlier Squeeze artifact), if it has one."""
        import tempfile

        from huggingface_hub.errors import EntryNotFoundError

        with tempfile.TemporaryDirectory() as cache:
            try:
                path = api.hf_hub_download(self.repo_id, MANIFEST_NAME, revision=revision, cache_dir=cache)
            except EntryNotFoundError:
                return set()
            previous = json.loads(Path(path).read_text())
        return set(previous.get("files", {})) | {MANIFEST_NAME}


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""
