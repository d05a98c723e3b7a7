"""Where a job may write. Checked at submit (422) and again by the worker before it publishes (a
stored spec may predate these rules).

- no URI: `<artifact root>/<job id>`, made by the job itself;
- a local folder (`name`, `a/b`, `file://...`, or an absolute path below the artifact root): a NEW
  folder below the artifact root, named by plain path components (none starting with `.` or `~`, no job
  id as its first component: those are the default folders), reached through real folders only (no
  symlink) that hold no job's artifact, and not existing yet;
- `s3://bucket[/prefix]` with a valid bucket name; `hf://namespace/repo` (or `hub://`).

Every refusal of a local destination says the same thing, so an answer never tells which paths exist.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path, PurePosixPath

OWNER_MARKER = ".squeeze-owner.json"  # in a published local artifact: {"job_id", "attempt"}
MANIFEST_NAME = "squeeze.json"
LOCAL_RULE = ("a local destination must be a new folder below the artifact root: a relative path of plain "
              "names (none starting with '.' or '~', no job ids, at most 255 bytes each) that nothing uses yet")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class DestinationRefused(ValueError):
    """A destination a job may not write to; the message is for the user."""


def scheme_of(uri: str | None) -> str:
    if uri is None or "://" not in uri:
        return "local"
    scheme = uri.split("://", 1)[0]
    return "local" if scheme == "file" else scheme


def check_destination(uri: str | None, artifacts_dir: Path) -> None:
    """Raise DestinationRefused unless a new job may write to `uri`."""
    scheme = scheme_of(uri)
    if scheme == "local":
        if uri is not None:
            local_target(uri, artifacts_dir, job_id=None)
    elif scheme == "s3":
        s3_location(uri)
    elif scheme in ("hf", "hub"):
        hub_repo(uri)


def s3_location(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket[/prefix]; the prefix has no empty, '.' or '..' parts."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    if not S3_BUCKET.match(bucket) or ".." in bucket or any(p in ("", ".", "..") for p in parts):
        raise DestinationRefused("expected s3://<bucket>/<prefix>: a bucket name of 3-63 lowercase letters, digits, "
                                 "'.' or '-', and a prefix of non-empty parts other than '.' and '..'")
    return bucket, "/".join(parts)


def hub_repo(uri: str) -> str:
    repo_id = uri.split("://", 1)[1].strip("/")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(HUB_PART.match(p) and ".." not in p and not p.endswith(".git") for p in parts):
        raise DestinationRefused("expected hf://<namespace>/<repo> (letters, digits, '_', '.', '-')")
    return repo_id


def local_target(uri: str | None, artifacts_dir: Path, job_id: str | None) -> Path:
    """The folder a local destination names, after checking the rules. With `job_id` (the worker),
    a folder that this job's own earlier attempt published is allowed, so a retry can replace it."""
    if uri is None:
        if job_id is None:
            raise ValueError("the default destination needs the job id")
        relative = PurePosixPath(job_id)
    else:
        relative = _relative_below(uri, artifacts_dir)
        if _is_uuid(relative.parts[0]):
            raise DestinationRefused(LOCAL_RULE)
    current = artifacts_dir
    for part in relative.parts[:-1]:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()) or _is_artifact(current):
            raise DestinationRefused(LOCAL_RULE)
    target = artifacts_dir / relative
    if os.path.lexists(target) and not (job_id is not None and owner_of(target) == job_id):
        raise DestinationRefused(LOCAL_RULE)
    return target


def owner_of(folder: Path) -> str | None:
    """The job id a published local artifact (a real folder, not a symlink) belongs to."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        return json.loads((folder / OWNER_MARKER).read_text())["job_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _relative_below(uri: str, artifacts_dir: Path) -> PurePosixPath:
    raw = uri.removeprefix("file://")
    if "\x00" in raw or "\\" in raw:
        raise DestinationRefused(LOCAL_RULE)
    path = PurePosixPath(raw)
    if path.is_absolute():
        try:
            path = path.relative_to(PurePosixPath(artifacts_dir))
        except ValueError:
            raise DestinationRefused(LOCAL_RULE) from None
    # PurePosixPath drops '.' parts and empty names ("a//b"); compare with the raw split to catch them
    raw_parts = [p for p in raw.split("/") if p] if not PurePosixPath(raw).is_absolute() else list(path.parts)
    parts = path.parts
    if (not parts or list(parts) != raw_parts
            or any(p.startswith((".", "~")) or len(p.encode()) > 255 for p in parts)):
        raise DestinationRefused(LOCAL_RULE)
    return path


def _is_artifact(folder: Path) -> bool:
    return (folder / OWNER_MARKER).exists() or (folder / MANIFEST_NAME).exists()


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True
