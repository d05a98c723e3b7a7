"""Local-folder destination, the destination rules, and destination URI parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.jobs.destinations import LOCAL_RULE, OWNER_MARKER, DestinationRefused, check_destination, local_target
from worker.errors import LostOwnership
from worker.storage import (
    DestinationError,
    DestinationOptions,
    HubDestination,
    LocalDestination,
    S3Destination,
    destination_for,
    local_artifact_path,
)


def write(folder, files):
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def published_tree(folder):
    """The artifact's files, without the owner marker (checked on its own)."""
    return {k: v for k, v in tree(folder).items() if k != OWNER_MARKER}


def owner(folder):
    return json.loads((folder / OWNER_MARKER).read_text())


def test_local_publish_without_uri_goes_to_artifacts_dir_per_job(tmp_path):
    files = {"config.json": b"{}", "adapter/adapter_model.safetensors": b"lora"}
    local = write(tmp_path / "export", files)
    destination = destination_for(None, artifacts_dir=tmp_path / "artifacts")

    published = destination.publish(local, "job-1", 1)

    assert published.uri == "local:job-1"
    assert local_artifact_path(published.uri, tmp_path / "artifacts") == (tmp_path / "artifacts" / "job-1").resolve()
    assert published.files == sorted(files) and published_tree(tmp_path / "artifacts" / "job-1") == files
    assert owner(tmp_path / "artifacts" / "job-1") == {"job_id": "job-1", "attempt": 1}
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["job-1"]  # no staging debris
    assert tree(local) == files  # the export folder is left as it was


def test_a_retry_replaces_only_what_an_earlier_attempt_of_the_same_job_published(tmp_path):
    root = tmp_path / "artifacts"
    target = root / "my-model"
    write(target, {"config.json": b"old", "stale.bin": b"old"})  # attempt 1 published, then its worker died
    (target / OWNER_MARKER).write_text(json.dumps({"job_id": "job-2", "attempt": 1}))
    write(root / ".my-model.staging-job-2-1", {"config.json": b"half"})  # a crashed attempt of this job
    write(root / ".my-model.staging-job-9-1", {"config.json": b"other job"})  # not ours: left alone
    final = {"config.json": b"new", "model.safetensors": b"w"}

    published = destination_for("my-model", artifacts_dir=root).publish(write(tmp_path / "export", final), "job-2", 2)

    assert published.uri == "local:my-model" and published_tree(target) == final
    assert owner(target) == {"job_id": "job-2", "attempt": 2}
    assert sorted(p.name for p in root.iterdir()) == [".my-model.staging-job-9-1", "my-model"]


@pytest.mark.parametrize("marker", [None, {"job_id": "other-job", "attempt": 1}])
def test_an_existing_folder_that_is_not_this_jobs_is_never_touched(tmp_path, marker):
    root = tmp_path / "artifacts"
    theirs = write(root / "shared", {"config.json": b"theirs", "model.safetensors": b"their weights"})
    if marker:
        (theirs / OWNER_MARKER).write_text(json.dumps(marker))
    before = tree(theirs)
    with pytest.raises(DestinationError, match="must be a new folder below the artifact root"):
        destination_for("shared", artifacts_dir=root).publish(write(tmp_path / "export", {"a": b"mine"}), "job-3", 1)
    assert tree(theirs) == before
    assert sorted(p.name for p in root.iterdir()) == ["shared"]  # our staging folder is gone too


def test_a_stale_attempt_publishes_nothing(tmp_path):
    root = tmp_path / "artifacts"
    asked = []

    def still_owns():
        asked.append(True)
        return False

    with pytest.raises(LostOwnership):
        destination_for(None, artifacts_dir=root).publish(write(tmp_path / "export", {"a": b"x"}), "job-4", 1,
                                                          still_owns)
    assert asked == [True] and list(root.iterdir()) == []


def test_a_folder_that_appears_just_before_the_switch_is_not_replaced(tmp_path):
    root = tmp_path / "artifacts"

    def still_owns():  # runs right before the rename: another job's files appear at the target now
        write(root / "late", {"model.safetensors": b"theirs"})
        return True

    with pytest.raises(DestinationError, match="must be a new folder"):
        destination_for("late", artifacts_dir=root).publish(write(tmp_path / "export", {"a": b"mine"}), "job-5", 1,
                                                            still_owns)
    assert tree(root) == {"late/model.safetensors": b"theirs"}  # theirs intact, our staging gone


@pytest.mark.parametrize("uri", [
    "", ".", "./", "..", "../x", "a/../b", "a/./b", "/", "/etc/squeeze", ".hidden", "a/.b",
    "file://", "file://..", "0b6c3a52-4b59-4a6b-8d3e-2f1c9a9b7e11", "0b6c3a52-4b59-4a6b-8d3e-2f1c9a9b7e11/x",
    "x" * 256, "~", "~/x", "a\\..\\b", "ok\x00", "link-out/x", "link-out", "a-file", "a-file/x", "done-artifact/x",
    "existing", "ROOT", "ROOT/", "ROOT/existing", "ROOT/../x",
])
def test_local_destination_rules_refuse_with_one_message(tmp_path, uri):
    root = tmp_path / "artifacts"
    (root / "existing").mkdir(parents=True)
    (root / "a-file").write_text("x")
    (root / "done-artifact").mkdir()
    (root / "done-artifact" / "squeeze.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    uri = uri.replace("ROOT", str(root))
    with pytest.raises(DestinationRefused) as refused:
        check_destination(uri, root)
    assert str(refused.value) == LOCAL_RULE  # the same words whatever the reason: no existence oracle
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("uri,relative", [
    ("new-model", "new-model"), ("team/new-model", "team/new-model"), ("existing/new", "existing/new"),
    ("file://team/m", "team/m"), ("ROOT/abs-new", "abs-new"), ("a//b/", "a/b"),
])
def test_local_destination_rules_accept_new_folders_below_the_root(tmp_path, uri, relative):
    root = tmp_path / "artifacts"
    (root / "existing").mkdir(parents=True)
    uri = uri.replace("ROOT", str(root))
    check_destination(uri, root)
    assert local_target(uri, root, job_id="j") == root / relative


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3://B/x", "s3://ab", "s3://bucket/../x", "s3://bucket/a//b",
                                 "hf://just-a-name", "hf://a/b/c", "hf://../x", "hub://org/", "hf://org/repo.git"])
def test_remote_destination_shapes_are_checked(uri):
    with pytest.raises(DestinationRefused):
        check_destination(uri, Path("/unused"))


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
    for bad, message in (("s3:///prefix", "expected s3://"), ("hf://just-a-name", "expected hf://"),
                         ("gs://bucket/x", "unknown scheme 'gs'")):
        with pytest.raises(DestinationError, match=message):
            destination_for(bad, artifacts_dir=tmp_path)


def test_publishing_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(DestinationError, match="nothing to publish"):
        destination_for(None, artifacts_dir=tmp_path).publish(tmp_path / "missing", "job-1", 1)
