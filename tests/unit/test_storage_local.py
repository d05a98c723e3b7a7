"""Local-folder destination and destination URI parsing."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from worker.storage import (
    DestinationError,
    DestinationOptions,
    HubDestination,
    LocalDestination,
    S3Destination,
    destination_for,
)


def write(folder, files):
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_local_publish_without_uri_goes_to_artifacts_dir_per_job(tmp_path):
    files = {"config.json": b"{}", "adapter/adapter_model.safetensors": b"lora"}
    local = write(tmp_path / "export", files)
    destination = destination_for(None, artifacts_dir=tmp_path / "artifacts")

    published = destination.publish(local, "job-1", 1)

    assert published.uri == str((tmp_path / "artifacts" / "job-1").resolve())
    assert published.files == sorted(files) and tree(tmp_path / "artifacts" / "job-1") == files
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["job-1"]  # no staging debris
    assert tree(local) == files  # the export folder is left as it was


def test_local_retry_replaces_a_previous_partial_and_leaves_one_artifact(tmp_path):
    target = tmp_path / "artifacts" / "my-model"
    write(target, {"config.json": b"old", "stale.bin": b"old"})  # an earlier attempt's artifact
    write(tmp_path / "artifacts" / ".my-model.staging-job-2-1", {"config.json": b"half"})  # a crashed attempt
    write(tmp_path / "artifacts" / ".my-model.previous-job-2-0", {"config.json": b"older"})  # died between renames
    final = {"config.json": b"new", "model.safetensors": b"w"}

    published = destination_for("my-model", artifacts_dir=tmp_path / "artifacts").publish(
        write(tmp_path / "export", final), "job-2", 2)

    assert published.uri == str(target.resolve()) and tree(target) == final
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["my-model"]


def test_destination_uris_choose_the_destination(tmp_path):
    assert isinstance(destination_for("file:///tmp/x", artifacts_dir=tmp_path), LocalDestination)
    s3 = destination_for("s3://bucket/a/b/", artifacts_dir=tmp_path, s3_endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Destination) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert s3.job_prefix("j") == "a/b/j/" and s3.client.meta.endpoint_url == "http://127.0.0.1:9"
    token = SecretStr("hf_job_secret")
    hub = destination_for("hub://org/repo", artifacts_dir=tmp_path,
                          options=DestinationOptions(private=False, create_repo=False, token=token))
    assert isinstance(hub, HubDestination) and (hub.repo_id, hub.private, hub.create_repo) == ("org/repo", False, False)
    assert hub.token is token and "hf_job_secret" not in repr(hub)
    server = destination_for("hf://org/repo", artifacts_dir=tmp_path, hf_token=SecretStr("server"))
    assert server.token.get_secret_value() == "server" and server.private is True
    for bad, message in (("s3:///prefix", "no bucket"), ("hf://just-a-name", "expected hf://"),
                         ("gs://bucket/x", "unknown scheme 'gs'")):
        with pytest.raises(DestinationError, match=message):
            destination_for(bad, artifacts_dir=tmp_path)


def test_publishing_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(DestinationError, match="nothing to publish"):
        destination_for(None, artifacts_dir=tmp_path).publish(tmp_path / "missing", "job-1", 1)
