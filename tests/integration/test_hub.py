"""Hub download (worker.hub.resolve_model) and upload (worker.storage.HubDestination) against a
LOCAL STAND-IN for the Hugging Face Hub (tests/hub_standin.py, a loopback HTTP server speaking the
parts of the Hub API huggingface_hub calls), and a local folder laid out like a Hub snapshot cache.
No test here talks to the real Hub.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr
from rich.console import Console

from app.settings import Settings
from tests.hub_standin import HubStandin
from worker.errors import JobFailure, LostOwnership
from worker.hub import resolve_model
from worker.models import load_model
from worker.storage import DestinationError, HubDestination, destination_for

TOKEN = "hf_standin_job_token_7f3a9c"
REPO = "squeeze-org/tiny-llama"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with huggingface_hub pointed at it (HF_ENDPOINT and the constants derived from it
    at import time) and isolated from any token or cache on this machine."""
    import huggingface_hub.constants as constants

    with HubStandin(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield server


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", allow_local_paths=False)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- download ----------------------------------------------------------------------------------

def test_hub_download_through_local_standin_server_pins_the_commit_and_skips_pickles(hub, settings, tiny_model_dir):
    files = folder_files(tiny_model_dir)
    repo = hub.add_repo(REPO, {**files, "pytorch_model.bin": b"pickle", "training_args.bin": b"pickle"})
    first_sha = repo.branches["main"]

    resolved = resolve_model(REPO, "main", settings)

    assert resolved.source == "hub" and resolved.revision == first_sha and re.fullmatch(r"[0-9a-f]{40}", first_sha)
    downloaded = folder_files(resolved.path)
    assert downloaded == files  # safetensors, config and tokenizer, byte for byte; no pickle
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.file_requests(REPO)}
    assert not fetched & {"pytorch_model.bin", "training_args.bin"}
    model, _ = load_model(resolved.path)
    assert model.config.model_type == "llama"

    # A later commit on main does not change what a pinned SHA downloads.
    repo.commit("update config", {**repo.at("main").files, "config.json": files["config.json"] + b" "})
    again = resolve_model(REPO, first_sha, settings)
    assert again.revision == first_sha and folder_files(again.path)["config.json"] == files["config.json"]
    assert resolve_model(REPO, "main", settings).revision == repo.branches["main"] != first_sha


def test_hub_download_goes_to_the_settings_mirror(hub, tmp_path, tiny_model_dir):
    """Settings.hf_endpoint (a mirror; the API's routing reads config.json from it) is where the worker
    downloads from too, not huggingface_hub's default endpoint."""
    files = folder_files(tiny_model_dir)
    with HubStandin(token=TOKEN) as mirror:
        sha = mirror.add_repo(REPO, files).branches["main"]
        settings = Settings(data_dir=tmp_path / "data", allow_local_paths=False, hf_endpoint=mirror.url)
        checked = []
        resolved = resolve_model(REPO, "main", settings, check_config=checked.append)
        assert resolved.revision == sha and folder_files(resolved.path) == files
        assert {r.path.rsplit("/", 1)[-1] for r in mirror.file_requests(REPO)} == set(files)
        assert len(checked) == 1
    assert hub.requests == []  # the default endpoint was never asked


def test_hub_download_uses_a_local_folder_laid_out_like_a_hub_snapshot(hub, settings, tiny_model_dir):
    """The files already sit in the Hub cache layout (models--org--name/snapshots/<sha>/...): only the
    metadata calls (model info, tree listing) reach the stand-in, no file is downloaded."""
    files = folder_files(tiny_model_dir)
    sha = hub.add_repo(REPO, files).branches["main"]
    cache = settings.data_dir / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = cache / "snapshots" / sha
    for relative, content in files.items():
        (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / relative).write_bytes(content)
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(sha)

    resolved = resolve_model(REPO, "main", settings)

    assert resolved.path == snapshot and resolved.revision == sha
    assert hub.file_requests(REPO) == []
    assert [r.path for r in hub.requests if r.path.startswith("/api/")] == [
        f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/tree/{sha}"]


def test_hub_download_refuses_a_pickle_only_repo(hub, settings):
    hub.add_repo(REPO, {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(JobFailure, match=r"no safetensors weights \(it has only pickle weights: pytorch_model.bin\)"):
        resolve_model(REPO, "main", settings)
    assert hub.file_requests(REPO) == []


def test_hub_download_checks_the_size_limit_before_downloading(hub, tmp_path, tiny_model_dir):
    hub.add_repo(REPO, folder_files(tiny_model_dir))
    small = Settings(data_dir=tmp_path / "data", max_model_bytes=10_000)
    with pytest.raises(JobFailure, match="above this server's limit"):
        resolve_model(REPO, "main", small)
    assert hub.file_requests(REPO) == []


def test_hub_download_of_a_private_repo_sends_the_token_and_never_logs_it(hub, settings, tiny_model_dir, caplog):
    hub.add_repo(REPO, folder_files(tiny_model_dir), private=True)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(JobFailure, match="not found on the Hugging Face Hub") as no_token:
        resolve_model(REPO, "main", settings)

    resolved = resolve_model(REPO, "main", settings, token=TOKEN)

    assert resolved.source == "hub"
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests[1:])
    assert TOKEN not in caplog.text and TOKEN not in str(no_token.value) and TOKEN not in repr(resolved)


def test_hub_download_unknown_revision_fails_clearly(hub, settings, tiny_model_dir):
    hub.add_repo(REPO, folder_files(tiny_model_dir))
    with pytest.raises(JobFailure, match="has no revision 'v9'"):
        resolve_model(REPO, "v9", settings)


def test_hub_download_shows_the_config_alone_before_fetching_the_weights(hub, settings, tiny_model_dir):
    files = folder_files(tiny_model_dir)
    sha = hub.add_repo(REPO, files).branches["main"]
    seen: list[tuple[Path, list[str]]] = []

    resolved = resolve_model(REPO, "main", settings,
                             check_config=lambda folder: seen.append((folder, sorted(os.listdir(folder)))))

    assert seen == [(resolved.path, ["config.json"])] and resolved.path.name == sha
    fetched = [r.path.rsplit("/", 1)[-1] for r in hub.file_requests(REPO) if r.method == "GET"]
    assert fetched[0] == "config.json" and fetched.count("config.json") == 1 and "model.safetensors" in fetched
    assert folder_files(resolved.path) == files


def test_a_hub_model_too_big_for_this_worker_is_refused_before_its_weights_are_downloaded(hub, tmp_path):
    """The whole pipeline, as the worker runs it: the refusal comes from config.json, fetched alone."""
    import uuid

    from transformers import LlamaConfig

    from app.jobs.spec import JobSpec
    from worker.cli_compress import ConsoleReporter
    from worker.pipeline import run_pipeline

    folder = tmp_path / "llama-405b-config"  # ~1.6 TB of fp32 weights, loaded whole
    LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)
    hub.add_repo(REPO, {"config.json": (folder / "config.json").read_bytes(), "model.safetensors": b"\0" * 4096})
    settings = Settings(data_dir=tmp_path / "data", artifact_root=tmp_path / "artifacts", device="cpu",
                        stream_layers=False, memory_check=True)
    spec = JobSpec.model_validate({"model": {"id": REPO}, "quantization": {"method": "rtn", "bits": 4},
                                   "calibration": {"dataset": "org/data", "num_samples": 8, "seq_len": 32}})

    with pytest.raises(JobFailure, match=r"predicted to need \d+\.\d\d GiB of host memory"):
        run_pipeline(uuid.uuid4(), spec, settings, ConsoleReporter(Console(file=io.StringIO())))

    assert {r.path.rsplit("/", 1)[-1] for r in hub.file_requests(REPO)} == {"config.json"}  # no weights
    assert not list((settings.data_dir / "hub").rglob("*.safetensors"))


# --- upload ------------------------------------------------------------------------------------

def artifact(folder: Path, with_adapter: bool = True, card: str = "v1") -> Path:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 4096 + b"weights",
             "tokenizer.json": b"{}", "README.md": f"---\ntags:\n- squeeze\n---\n# card {card}\n".encode()}
    if with_adapter:
        files |= {"adapter/adapter_config.json": b'{"r": 8}', "adapter/adapter_model.safetensors": b"lora"}
    files["squeeze.json"] = ('{"files": {' + ", ".join(f'"{name}": {{}}' for name in sorted(files)) + "}}").encode()
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def test_hub_upload_against_local_standin_server_commits_every_file(hub, tmp_path, caplog):
    local = artifact(tmp_path / "export")
    caplog.set_level(logging.DEBUG)
    destination = destination_for(f"hf://{REPO}", artifacts_dir=tmp_path, hf_endpoint=hub.url,
                                  hf_token=SecretStr(TOKEN))

    published = destination.publish(local, "job-1", 1)

    repo = hub.repos[REPO]
    assert repo.private is True  # the default for a new repo
    squeeze_commits = [c for c in repo.commits if c.message.startswith("Squeeze")]
    assert len(squeeze_commits) == 1
    commit = squeeze_commits[0]
    expected = folder_files(local)
    assert sorted(commit.added) == sorted(expected) == published.files
    assert {name: commit.files[name] for name in expected} == expected
    assert commit.message == "Squeeze job job-1 (attempt 1)"
    assert published.uri == f"hf://{REPO}@{commit.sha}" and repo.branches["main"] == commit.sha
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    assert TOKEN not in caplog.text and TOKEN not in repr(destination)


def test_hub_upload_retry_replaces_the_previous_artifact_in_one_commit(hub, tmp_path):
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url)
    destination.publish(artifact(tmp_path / "a1"), "job-1", 1)
    repo = hub.repos[REPO]
    repo.commit("user adds notes", {**repo.at("main").files, "NOTES.md": b"mine"})

    published = destination.publish(artifact(tmp_path / "a2", with_adapter=False, card="v2"), "job-1", 2)

    head = repo.at("main")
    assert head.message == "Squeeze job job-1 (attempt 2)"
    assert sorted(head.deleted) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert sorted(head.files) == sorted([".gitattributes", "NOTES.md", *published.files])
    assert head.files["README.md"].endswith(b"# card v2\n")


def test_hub_upload_refuses_a_public_repo_for_a_private_job(hub, tmp_path):
    hub.add_repo(REPO, {"README.md": b"public"}, private=False)
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url, private=True)
    with pytest.raises(DestinationError, match="exists and is public"):
        destination.publish(artifact(tmp_path / "a"), "job-1", 1)
    assert len(hub.repos[REPO].commits) == 2  # nothing committed


def test_hub_upload_without_create_repo_needs_an_existing_repo(hub, tmp_path):
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url, create_repo=False)
    with pytest.raises(DestinationError, match="does not exist .* create_repo is off"):
        destination.publish(artifact(tmp_path / "a"), "job-1", 1)
    assert REPO not in hub.repos


def test_hub_upload_with_a_wrong_token_fails_without_echoing_it(hub, tmp_path):
    wrong = "hf_wrong_token_0000"
    destination = HubDestination(REPO, token=SecretStr(wrong), endpoint=hub.url)
    with pytest.raises(DestinationError) as failure:
        destination.publish(artifact(tmp_path / "a"), "job-1", 1)
    assert "upload to the Hugging Face Hub repo" in str(failure.value) and wrong not in str(failure.value)
    assert REPO not in hub.repos


def test_hub_upload_retry_of_an_identical_artifact_adds_no_commit(hub, tmp_path):
    """A worker that died after publishing but before recording success retries the same files."""
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url)
    first = destination.publish(artifact(tmp_path / "a"), "job-1", 1)
    commits = len(hub.repos[REPO].commits)

    again = destination.publish(artifact(tmp_path / "b"), "job-1", 2)

    assert again.uri == first.uri and len(hub.repos[REPO].commits) == commits


def test_hub_upload_fails_instead_of_mixing_when_someone_commits_meanwhile(hub, tmp_path, monkeypatch):
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url)
    destination.publish(artifact(tmp_path / "a"), "job-1", 1)
    repo = hub.repos[REPO]
    read_previous = HubDestination._previous_files

    def concurrent_commit(self, api, revision):
        files = read_previous(self, api, revision)
        repo.commit("someone else", {**repo.at("main").files, "config.json": b"theirs"})
        return files

    monkeypatch.setattr(HubDestination, "_previous_files", concurrent_commit)
    with pytest.raises(DestinationError, match="failed: HfHubHTTPError"):
        destination.publish(artifact(tmp_path / "b", card="v2"), "job-1", 2)
    assert repo.at("main").message == "someone else" and repo.at("main").files["config.json"] == b"theirs"


def test_a_stale_attempt_makes_no_hub_commit(hub, tmp_path):
    destination = HubDestination(REPO, token=SecretStr(TOKEN), endpoint=hub.url)
    with pytest.raises(LostOwnership):
        destination.publish(artifact(tmp_path / "a1"), "job-1", 1, still_owns=lambda: False)
    commits = hub.repos[REPO].commits if REPO in hub.repos else []
    assert [c for c in commits if c.message.startswith("Squeeze")] == []


# --- routing by memory class reads only config.json ---------------------------------------------

def test_routing_reads_only_the_config_of_a_hub_model(hub, tmp_path):
    import json

    from app.jobs.routing import route_job
    from app.jobs.spec import JobSpec
    from tests.unit.test_routing import LLAMA_70B

    hub.add_repo(REPO, {"config.json": json.dumps(LLAMA_70B).encode(), "model.safetensors": b"weights"})
    settings = Settings(data_dir=tmp_path / "data", memory_classes_gib=[1, 16], hf_endpoint=hub.url)
    spec = JobSpec.model_validate({"model": {"id": REPO}, "quantization": {"method": "rtn", "bits": 4},
                                   "calibration": {"dataset": "org/data"}})
    route = route_job(settings, spec)
    assert (route.memory_class, route.queue) == ("16gib", "squeeze.16gib")
    assert {r.path.rsplit("/", 1)[-1] for r in hub.file_requests(REPO)} == {"config.json"}  # no weights
    asked = len(hub.requests)
    assert route_job(settings, spec).memory_class == "16gib"  # again, from the cache: the Hub is not asked
    assert len(hub.requests) == asked
