"""Calibration uploads: files in settings.uploads_dir, one row each, owned by a tenant, counted against
its quota, deletable, and deleted by the reaper after the retention period."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.auth import Caller
from app.db.base import utcnow
from app.db.models import Upload
from app.errors import InvalidSpec, TooLarge, UploadNotFound
from app.settings import Settings

SUFFIXES = {".txt", ".jsonl", ".parquet"}
PREFIX = "upload:"
CHUNK = 1024**2


def used_bytes(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.coalesce(func.sum(Upload.bytes), 0)).where(Upload.tenant_id == tenant_id))


def store(session: Session, settings: Settings, caller: Caller, filename: str, source: BinaryIO) -> Upload:
    """Copies the file in, counting bytes: 413 above max_upload_bytes or the tenant's quota."""
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidSpec("file", f"calibration uploads must be one of {', '.join(sorted(SUFFIXES))}")
    room = settings.tenant_upload_quota_bytes - used_bytes(session, caller.tenant_id)
    limit = min(settings.max_upload_bytes, room)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    upload_id = uuid.uuid4().hex
    partial = settings.uploads_dir / f".{upload_id}{suffix}.partial"
    size = 0
    try:
        with partial.open("wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    if size > settings.max_upload_bytes:
                        raise TooLarge(f"an upload may hold at most {settings.max_upload_bytes} bytes")
                    raise TooLarge(f"this upload would pass the tenant's upload quota of "
                                   f"{settings.tenant_upload_quota_bytes} bytes ({max(room, 0)} left); "
                                   "delete old uploads (DELETE /v1/uploads/{id})")
                out.write(chunk)
        if size == 0:
            raise InvalidSpec("file", "the uploaded file is empty")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    name = f"{upload_id}{suffix}"
    partial.rename(settings.uploads_dir / name)
    upload = Upload(id=upload_id, tenant_id=caller.tenant_id, filename=name, bytes=size, created_at=utcnow())
    session.add(upload)
    session.flush()
    return upload


def get(session: Session, caller: Caller, upload_id: str) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or not caller.sees(upload.tenant_id):
        raise UploadNotFound(f"no upload with id {upload_id}")
    return upload


def list_for(session: Session, caller: Caller, limit: int) -> list[Upload]:
    query = select(Upload).order_by(Upload.created_at.desc(), Upload.id.desc()).limit(limit)
    if not caller.admin:
        query = query.where(Upload.tenant_id == caller.tenant_id)
    return list(session.scalars(query))


def remove(session: Session, settings: Settings, upload: Upload) -> bool:
    """Deletes the row, then the file; False when the row was gone already (another reaper took it)."""
    if session.execute(delete(Upload).where(Upload.id == upload.id)).rowcount != 1:
        return False
    (settings.uploads_dir / upload.filename).unlink(missing_ok=True)
    return True


def check_dataset_owned(session: Session, caller: Caller, field: str, dataset: str | None) -> None:
    """A job may read only its own tenant's uploads (admins: any)."""
    if dataset is None or not dataset.startswith(PREFIX):
        return
    upload = session.get(Upload, dataset.removeprefix(PREFIX))
    if upload is None or not caller.sees(upload.tenant_id):
        raise InvalidSpec(field, f"no upload with id '{dataset.removeprefix(PREFIX)}'")


def delete_expired(session: Session, settings: Settings, now: datetime) -> int:
    cutoff = now - timedelta(hours=settings.upload_retention_hours)
    expired = list(session.scalars(select(Upload).where(Upload.created_at < cutoff).order_by(Upload.id)))
    return sum(remove(session, settings, upload) for upload in expired)
