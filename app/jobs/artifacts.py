"""A finished job's local artifact files, for download through the API.

Only files the job recorded at publish time (`artifacts.files`) can be named, and each must resolve,
without following any symlink, to a regular file strictly inside the job's own folder below the
artifact root. S3 and Hub artifacts are not proxied: the answer names their URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from app.db.models import Job, JobStatus
from app.errors import ArtifactElsewhere, ArtifactNotFound, JobStateConflict
from app.jobs.destinations import MANIFEST_NAME
from app.settings import Settings

LOCAL_URI_PREFIX = "local:"  # as worker.storage writes it: the folder's path below the artifact root


@dataclass(frozen=True)
class ArtifactFile:
    path: str
    bytes: int
    sha256: str


def _folder(settings: Settings, job: Job) -> tuple[str, Path]:
    """(uri, folder) of a succeeded job's local artifact."""
    if job.status != JobStatus.succeeded or not job.artifacts:
        raise JobStateConflict(f"job {job.id} is {job.status.value}; only a succeeded job has artifacts")
    uri = str(job.artifacts.get("uri", ""))
    if not uri.startswith(LOCAL_URI_PREFIX):
        raise ArtifactElsewhere(f"job {job.id}'s artifact is not stored on this server; fetch it from {uri}", uri)
    root = settings.artifacts_dir
    folder = root / uri.removeprefix(LOCAL_URI_PREFIX)
    if folder.resolve() != folder or not folder.is_relative_to(root) or folder == root or not folder.is_dir():
        raise ArtifactNotFound(f"job {job.id}'s artifact folder is gone from this server")
    return uri, folder


def _open_inside(folder: Path, relative: str) -> int:
    """An O_RDONLY descriptor of folder/relative, refusing '..', absolute paths, symlinks and non-files."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ArtifactNotFound(f"no artifact file {relative!r}")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError:
        raise ArtifactNotFound(f"no artifact file {relative!r}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise ArtifactNotFound(f"no artifact file {relative!r}")
    return file_fd


def _recorded(job: Job) -> list[str]:
    return [str(name) for name in (job.artifacts or {}).get("files", [])]


def open_file(settings: Settings, job: Job, relative: str) -> tuple[int, int]:
    """(descriptor, size) of one recorded file of the job's artifact; the caller closes the descriptor."""
    _, folder = _folder(settings, job)
    if relative not in _recorded(job):
        raise ArtifactNotFound(f"no artifact file {relative!r}")
    fd = _open_inside(folder, relative)
    return fd, os.fstat(fd).st_size


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def list_files(settings: Settings, job: Job) -> tuple[str, list[ArtifactFile]]:
    """The recorded files with their sizes and sha256: from the export's manifest when it lists the
    file with the size on disk (hashing a large checkpoint on every listing would be slow), else hashed."""
    uri, folder = _folder(settings, job)
    manifest: dict = {}
    if MANIFEST_NAME in _recorded(job):
        fd = _open_inside(folder, MANIFEST_NAME)
        with os.fdopen(fd, "rb") as handle:
            manifest = json.loads(handle.read()).get("files", {})
    files = []
    for relative in _recorded(job):
        fd = _open_inside(folder, relative)
        try:
            size = os.fstat(fd).st_size
            known = manifest.get(relative) or {}
            digest = known["sha256"] if known.get("bytes") == size and "sha256" in known else _sha256(fd)
        finally:
            os.close(fd)
        files.append(ArtifactFile(relative, size, digest))
    return uri, files
