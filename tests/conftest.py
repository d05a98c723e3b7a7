"""Shared fixtures. The tiny-model fixtures live in tests/fixtures_models.py.

FastAPI's TestClient sends `Host: testserver`; the Host check (app/http_guards.py) must let it in,
here and in the server processes the tests start.
"""

import os

os.environ.setdefault("SQUEEZE_ALLOWED_HOSTS", '["localhost", "127.0.0.1", "testserver"]')

from tests.fixtures_models import (  # noqa: E402, F401  (pytest discovers fixtures by name)
    calibration_windows,
    tiny_llama,
    tiny_model_dir,
    tiny_tokenizer,
    torch_threads,
)
