"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema (schemathesis + hypothesis),
with API keys on: no request may get a 5xx, and every response must match the schema it documents
(status code, content type, body).

Runs in CI with the rest of the suite (`make test`). Examples per operation: SQUEEZE_FUZZ_EXAMPLES
(default 40).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings
from tests.services import bearer, create_api_key

DATA_DIR = Path(tempfile.mkdtemp(prefix="squeeze-fuzz-"))  # made at import: the schema is loaded at collection
atexit.register(shutil.rmtree, DATA_DIR, True)
SETTINGS = Settings(data_dir=DATA_DIR, auth="on", allow_local_paths=False, max_queued_jobs_per_tenant=10_000)
APP = create_app(SETTINGS, run_reaper=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_key():
    with TestClient(APP):  # runs the lifespan: migrations, engine, dispatcher
        yield create_api_key(SETTINGS, "fuzzer")


@schema.parametrize()
@hypothesis_settings(max_examples=int(os.environ.get("SQUEEZE_FUZZ_EXAMPLES", "40")), deadline=None,
                     suppress_health_check=list(HealthCheck))
def test_api_answers_every_generated_request_within_its_schema(case, api_key):
    case.call_and_validate(headers=bearer(api_key), checks=CHECKS)


def test_fuzzing_ran_authenticated(api_key):
    """The fuzz above must not be a run of 401s: with the key, listing works."""
    with TestClient(APP) as client:
        assert client.get("/v1/jobs", headers=bearer(api_key)).status_code == 200
        assert client.get("/v1/jobs").status_code == 401
