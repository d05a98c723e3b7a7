"""S3 destination against a real S3-protocol server on loopback: moto's server mode
(moto.server.ThreadedMotoServer on 127.0.0.1, a free port), spoken to over HTTP by boto3 exactly as
AWS or MinIO would be. moto is an emulator, not AWS: the tests check our protocol (keys, multipart,
marker last, clean-up of earlier attempts), not AWS's consistency guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from tests.integration.conftest import CREDENTIALS
from worker.errors import LostOwnership
from worker.storage import S3_MARKER, DestinationError, S3Destination, destination_for

MiB = 1024**2
# S3 (and moto) require parts of at least 5 MiB except the last; an 11 MiB file makes 3 parts.
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=1)


class SimulatedCrash(Exception):
    """Stands for the worker dying mid-upload: nothing of ours runs after it."""


def write_artifact(folder, files):
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def artifact_files(big_seed=0, extra=None):
    big = hashlib.sha256(str(big_seed).encode()).digest() * (11 * MiB // 32)  # 11 MiB, 3 parts
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": big, "README.md": b"# card",
             "adapter/adapter_config.json": b'{"r": 8}', "adapter/adapter_model.safetensors": b"lora" * 100,
             "squeeze.json": b'{"files": {}}'}
    return files | (extra or {})


def keys(client, bucket, prefix=""):
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def open_uploads(client, bucket):
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def body(client, bucket, key):
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def record_calls(client):
    calls = []
    client.meta.events.register("before-parameter-build.s3", lambda model, params, **_: calls.append(
        (model.name, params.get("Key"))))
    return calls


def test_publish_uploads_every_file_multipart_and_writes_the_marker_last(client, bucket, tmp_path):
    files = artifact_files()
    local = write_artifact(tmp_path / "export", files)
    calls = record_calls(client)
    destination = S3Destination(bucket, "models/run", client=client, transfer_config=SMALL_PARTS)

    published = destination.publish(local, "job-1", 1)

    base = "models/run/job-1/"
    assert published.uri == f"s3://{bucket}/{base}" and published.files == sorted(files)
    assert keys(client, bucket) == sorted([base + name for name in files] + [base + S3_MARKER])
    for name, content in files.items():
        assert body(client, bucket, base + name) == content, name
    writes = [(op, key) for op, key in calls if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", base + S3_MARKER)
    assert [op for op, key in calls if key == base + "model.safetensors"].count("UploadPart") == 3
    marker = destination.completed("job-1")
    assert marker["attempt"] == 1 and marker["files"] == {
        name: {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()} for name, content in files.items()}


def test_interrupted_upload_then_retry_leaves_exactly_one_complete_artifact(client, s3_url, bucket, tmp_path):
    base = "runs/job-7/"
    first = write_artifact(tmp_path / "attempt1", artifact_files(extra={"adapter/stale.safetensors": b"old"}))
    parts = []

    def crash_on_second_part(**_):
        parts.append(1)
        if len(parts) == 2:
            raise SimulatedCrash("worker killed during the upload")

    def no_cleanup(**_):  # a killed process never aborts its multipart upload
        raise SimulatedCrash("worker already dead")

    crashing = boto3.client("s3", endpoint_url=s3_url, **CREDENTIALS)
    crashing.meta.events.register("before-call.s3.UploadPart", crash_on_second_part)
    crashing.meta.events.register("before-call.s3.AbortMultipartUpload", no_cleanup)
    with pytest.raises(SimulatedCrash):
        S3Destination(bucket, "runs", client=crashing, transfer_config=SMALL_PARTS).publish(first, "job-7", 1)

    # The interrupted attempt left debris, but nothing a reader trusts.
    destination = S3Destination(bucket, "runs", client=client, transfer_config=SMALL_PARTS)
    assert destination.completed("job-7") is None
    assert base + "adapter/stale.safetensors" in keys(client, bucket) and len(open_uploads(client, bucket)) == 1

    final_files = artifact_files(big_seed=1)
    retry = write_artifact(tmp_path / "attempt2", final_files)
    published = destination.publish(retry, "job-7", 2)

    assert keys(client, bucket) == sorted([base + name for name in final_files] + [base + S3_MARKER])
    assert open_uploads(client, bucket) == []
    assert body(client, bucket, base + "model.safetensors") == final_files["model.safetensors"]
    marker = destination.completed("job-7")
    assert marker["attempt"] == 2 and sorted(marker["files"]) == published.files == sorted(final_files)


def test_retry_after_a_complete_attempt_replaces_it(client, bucket, tmp_path):
    destination = S3Destination(bucket, "", client=client, transfer_config=SMALL_PARTS)
    destination.publish(write_artifact(tmp_path / "a1", artifact_files(extra={"extra.txt": b"x"})), "job-3", 1)
    calls = record_calls(client)

    destination.publish(write_artifact(tmp_path / "a2", artifact_files(big_seed=2)), "job-3", 2)

    assert calls[0] == ("DeleteObject", "job-3/" + S3_MARKER)  # withdrawn before anything changes
    assert keys(client, bucket) == sorted(["job-3/" + name for name in artifact_files()] + ["job-3/" + S3_MARKER])
    assert destination.completed("job-3")["attempt"] == 2


def test_a_concurrent_writer_prevents_the_marker(client, bucket, tmp_path):
    """If another (stale) attempt overwrites a key between our upload and our marker, the sha256
    check refuses to seal the mixed prefix."""
    destination = S3Destination(bucket, "p", client=client, transfer_config=SMALL_PARTS)
    other = {"done": False}

    def overwrite_once(params, **_):
        if not other["done"]:
            other["done"] = True
            client.put_object(Bucket=bucket, Key=params["Key"], Body=b"other attempt",
                              Metadata={"sha256": hashlib.sha256(b"other attempt").hexdigest()})

    client.meta.events.register("before-parameter-build.s3.HeadObject", overwrite_once)
    with pytest.raises(DestinationError, match="changed during the upload"):
        destination.publish(write_artifact(tmp_path / "a", artifact_files()), "job-9", 1)
    assert destination.completed("job-9") is None


def test_endpoint_url_comes_from_aws_endpoint_url_s3(s3_url, client, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_url)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    destination = destination_for(f"s3://{bucket}/team/models", artifacts_dir=tmp_path)
    local = write_artifact(tmp_path / "export", {"config.json": b"{}", "squeeze.json": b"{}"})

    published = destination.publish(local, "job-5", 1)

    assert published.uri == f"s3://{bucket}/team/models/job-5/"
    assert keys(client, bucket) == [f"team/models/job-5/{name}" for name in ("_SUCCESS", "config.json", "squeeze.json")]
    assert json.loads(body(client, bucket, f"team/models/job-5/{S3_MARKER}"))["job_id"] == "job-5"


def test_an_artifact_may_not_contain_the_marker_name(client, bucket, tmp_path):
    local = write_artifact(tmp_path / "export", {S3_MARKER: b"", "config.json": b"{}"})
    with pytest.raises(DestinationError, match="may not contain a file named _SUCCESS"):
        S3Destination(bucket, "", client=client).publish(local, "job-1", 1)
    assert keys(client, bucket) == []


def test_a_missing_bucket_fails_with_a_readable_error(client, tmp_path):
    local = write_artifact(tmp_path / "export", {"config.json": b"{}"})
    with pytest.raises(DestinationError, match="upload to s3://no-such-bucket/job-1/ failed.*NoSuchBucket"):
        S3Destination("no-such-bucket", "", client=client).publish(local, "job-1", 1)


def test_moto_is_served_over_loopback_http(s3_url):
    assert s3_url.startswith("http://127.0.0.1:") and "AWS_ENDPOINT_URL_S3" not in os.environ


def test_a_stale_attempt_never_seals_and_keys_outside_the_job_prefix_are_left_alone(client, bucket, tmp_path):
    neighbours = {"models/job-10": b"a key that is not a folder", "models/job-10/x": b"another job's file",
                  "models/job-1": b"prefix lookalike", "other/job-1/config.json": b"elsewhere"}
    for key, content in neighbours.items():
        client.put_object(Bucket=bucket, Key=key, Body=content)
    destination = S3Destination(bucket, "models", client=client, transfer_config=SMALL_PARTS)
    local = write_artifact(tmp_path / "export", {"config.json": b"{}"})

    with pytest.raises(LostOwnership):
        destination.publish(local, "job-1-stale", 2, still_owns=lambda: False)
    assert destination.completed("job-1-stale") is None  # no marker: readers never trust it

    destination.publish(local, "job-1", 1)
    assert {key: body(client, bucket, key) for key in neighbours} == neighbours
    assert keys(client, bucket, "models/job-1/") == ["models/job-1/_SUCCESS", "models/job-1/config.json"]


@pytest.mark.parametrize("ours", [True, False], ids=["owner", "stale"])
def test_a_failed_upload_leaves_no_partial_prefix_unless_another_attempt_owns_it(client, s3_url, bucket, tmp_path,
                                                                                  ours):
    from botocore.exceptions import ClientError

    def fail_second_part(**_):
        parts.append(1)
        if len(parts) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "the store failed"}}, "UploadPart")

    parts = []
    failing = boto3.client("s3", endpoint_url=s3_url, **CREDENTIALS)
    failing.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    client.put_object(Bucket=bucket, Key="runs/job-8x", Body=b"a neighbour")
    local = write_artifact(tmp_path / "export", artifact_files(extra={"adapter/a.safetensors": b"uploaded first"}))
    with pytest.raises(DestinationError, match="upload to s3://.*/runs/job-8/ failed"):
        S3Destination(bucket, "runs", client=failing, transfer_config=SMALL_PARTS).publish(
            local, "job-8", 1, still_owns=lambda: ours)
    if ours:  # the job failed: nothing of it stays in the store
        assert keys(client, bucket) == ["runs/job-8x"] and open_uploads(client, bucket) == []
    else:  # another attempt owns the prefix now: its upload is left alone
        assert "runs/job-8/adapter/a.safetensors" in keys(client, bucket)
