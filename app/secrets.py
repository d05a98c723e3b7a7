"""Per-job secrets (a Hugging Face token) sealed with the server's key before they touch the database.

The job row keeps only the ciphertext; the worker opens it for the job's run; it is erased when the
job ends. Embedded mode makes a key file in the data dir (mode 0600) on first use; distributed mode
needs SQUEEZE_SECRET_KEY, the same on the API and every worker.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from app.errors import InvalidSpec
from app.settings import Settings


def _key(settings: Settings, create: bool) -> bytes | None:
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    if not settings.embedded:
        return None
    path: Path = settings.data_dir / "secret.key"
    if not path.exists() and create:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(Fernet.generate_key())
    return path.read_bytes().strip() if path.exists() else None


def seal(settings: Settings, secret: str, field: str) -> str:
    key = _key(settings, create=True)
    if key is None:
        raise InvalidSpec(field, "this server has no SQUEEZE_SECRET_KEY configured, so it cannot keep per-job tokens")
    return Fernet(key).encrypt(secret.encode()).decode()


def unseal(settings: Settings, sealed: str) -> str:
    key = _key(settings, create=False)
    if key is None:
        raise ValueError("no secret key to open the job's token (SQUEEZE_SECRET_KEY differs from the API's?)")
    try:
        return Fernet(key).decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise ValueError("the job's token was sealed with another key (SQUEEZE_SECRET_KEY differs from the API's)") from None
