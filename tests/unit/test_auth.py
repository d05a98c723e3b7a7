"""API keys as the API checks them: each process remembers valid keys for auth_cache_seconds, no longer."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from app import auth
from app.auth import Caller, KeyCache
from app.db.session import make_engine, make_sessionmaker, unit_of_work
from app.main import create_app
from app.settings import Settings
from tests.services import bearer, create_api_key

SPEC = {"model": {"id": "org/model"}, "quantization": {"method": "rtn", "bits": 4},
        "calibration": {"dataset": "org/data"}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def serve(tmp_path, cache_seconds: float):
    settings = Settings(data_dir=tmp_path / "data", auth="on", auth_cache_seconds=cache_seconds)
    with TestClient(create_app(settings, run_reaper=False)) as client:  # the lifespan makes app.state.key_cache
        clock = Clock()
        client.app.state.key_cache.clock = clock
        yield client, settings, clock


def revoke(settings, key: str) -> None:
    """As `squeeze keys revoke` does it: another connection, outside the API process's cache."""
    engine = make_engine(settings)
    with unit_of_work(make_sessionmaker(engine)) as session:
        assert auth.revoke_key(session, key.split("_")[1]) is not None
    engine.dispose()


@pytest.fixture
def lookups(monkeypatch):
    calls = []
    real = auth.caller_for_key

    def counted(session, key):
        calls.append(key)
        return real(session, key)

    monkeypatch.setattr(auth, "caller_for_key", counted)
    return calls


def test_a_valid_key_is_looked_up_once_per_cache_period(tmp_path, lookups):
    with serve(tmp_path, 5) as (client, settings, clock):
        key = create_api_key(settings)
        for _ in range(3):
            assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        assert len(lookups) == 1
        clock.now += 5
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        assert len(lookups) == 2


def test_a_revoked_key_is_refused_once_its_cache_period_ends(tmp_path):
    with serve(tmp_path, 5) as (client, settings, clock):
        key = create_api_key(settings)
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        revoke(settings, key)
        clock.now += 4.9  # the trade-off: still remembered as valid
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        clock.now += 0.1
        for _ in range(2):  # looked up again, refused, and not remembered
            response = client.get("/v1/jobs", headers=bearer(key))
            assert response.status_code == 401 and response.json()["error"] == "unauthorized"


def test_without_the_cache_a_revocation_takes_effect_at_once(tmp_path):
    with serve(tmp_path, 0) as (client, settings, _):
        key = create_api_key(settings)
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        revoke(settings, key)
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 401


def test_wrong_keys_are_refused_while_the_right_one_is_cached_and_tenants_stay_apart(tmp_path, lookups):
    with serve(tmp_path, 5) as (client, settings, _):
        key_a, key_b = create_api_key(settings, "tenant-a"), create_api_key(settings, "tenant-b")
        job = client.post("/v1/jobs", json=SPEC, headers=bearer(key_a)).json()
        assert client.get(f"/v1/jobs/{job['id']}", headers=bearer(key_a)).status_code == 200
        wrong_secret = key_a[:-4] + ("AAAA" if not key_a.endswith("AAAA") else "BBBB")
        for wrong in (wrong_secret, f"sqz_{'0' * 12}_{'A' * 43}", key_a + "x"):
            for _ in range(2):
                assert client.get("/v1/jobs", headers=bearer(wrong)).status_code == 401
        assert lookups.count(wrong_secret) == 2  # refused keys are not remembered
        assert client.get(f"/v1/jobs/{job['id']}", headers=bearer(key_b)).status_code == 404
        assert client.get("/v1/jobs", headers=bearer(key_b)).json()["items"] == []


def test_the_cache_holds_at_most_its_size():
    clock = Clock()
    cache = KeyCache(5, size=2, clock=clock)
    cache.put("a", Caller("t"))
    clock.now += 3
    cache.put("b", Caller("t"))
    clock.now += 3  # a expired
    cache.put("c", Caller("t"))
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, Caller("t"), Caller("t"))
    cache.put("d", Caller("u"))  # full of live keys: starts again
    assert (cache.get("b"), cache.get("c"), cache.get("d")) == (None, None, Caller("u"))
