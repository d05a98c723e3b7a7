"""Layer checkpoints in S3 (moto over loopback): a job stopped on one machine resumes on another that
shares no disk with it, and ends bit for bit where an undisturbed run ends."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.integration.conftest import CREDENTIALS
from tests.unit.test_resume import PLANS, Stop, assert_same_run, stop_after
from worker.checkpoint_store import S3CheckpointStore, parse_s3_uri
from worker.resume import STATE_NAME, LayerCheckpoints
from worker.sequential import compress_model

CPU = torch.device("cpu")


def store(client, bucket):
    return S3CheckpointStore(f"s3://{bucket}/checkpoints", "job-1", client=client)


def stored(client, bucket) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.mark.parametrize("plan_name, stopped_after", [("gptq3 + eora r8, 4-bit adapters", 1),
                                                      ("gptq3 + eora budget (two walks)", 3)])
def test_an_attempt_on_another_machine_resumes_from_the_store(plan_name, stopped_after, client, bucket, tmp_path,
                                                              tiny_llama, calibration_windows):
    plan = PLANS[plan_name]
    reference_model = copy.deepcopy(tiny_llama)
    reference = compress_model(reference_model, calibration_windows, plan, CPU)

    first = LayerCheckpoints(tmp_path / "machine-a" / "job-1", 1, "k", store(client, bucket))
    assert first.take_over() is None
    with pytest.raises(Stop):
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=first,
                       on_layer=stop_after(stopped_after))
    keys = stored(client, bucket)
    assert keys and all(k.startswith("checkpoints/job-1/attempt-1/") for k in keys)
    assert "checkpoints/job-1/attempt-1/" + STATE_NAME in keys

    second = LayerCheckpoints(tmp_path / "machine-b" / "job-1", 2, "k", store(client, bucket))  # an empty disk
    resume = second.take_over()
    assert resume is not None and resume.run["step"] == stopped_after
    # the new attempt holds the state it resumes from; the first attempt's files are gone
    assert {k.replace("attempt-2/", "attempt-1/") for k in stored(client, bucket)} == set(keys)
    model = copy.deepcopy(tiny_llama)
    result = compress_model(model, calibration_windows, plan, CPU, checkpoints=second, resume=resume)
    assert_same_run(model, result, reference_model, reference)
    local = sorted(p.name for p in (tmp_path / "machine-b" / "job-1" / "attempt-2").iterdir())
    assert sorted(k.rsplit("/", 1)[1] for k in stored(client, bucket)) == local  # the store mirrors the disk

    store(client, bucket).clear()  # what discard_job_checkpoints does when the job ends
    assert stored(client, bucket) == []


def test_a_state_of_another_run_in_the_store_is_not_resumed(client, bucket, tmp_path, tiny_llama, calibration_windows):
    plan = PLANS["2:4 sparsegpt + gptq4"]
    first = LayerCheckpoints(tmp_path / "a", 1, "spec A", store(client, bucket))
    first.take_over()
    with pytest.raises(Stop):
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=first,
                       on_layer=stop_after(1))
    assert LayerCheckpoints(tmp_path / "b", 2, "spec B", store(client, bucket)).take_over() is None
    assert stored(client, bucket) == []
    assert list((tmp_path / "b" / "attempt-2").iterdir()) == []


def test_a_failing_store_leaves_its_last_complete_state_and_the_run_goes_on(client, s3_url, bucket, tmp_path,
                                                                            tiny_llama, calibration_windows):
    import boto3

    plan = PLANS["2:4 sparsegpt + gptq4"]
    flaky = boto3.client("s3", endpoint_url=s3_url, **CREDENTIALS)
    puts = []

    def fail_the_second_layer(params, **_):
        puts.append(params["Key"])
        if "compress-layer-1" in params["Key"]:
            raise ConnectionError("the store went away")

    flaky.meta.events.register("before-parameter-build.s3.PutObject", fail_the_second_layer)
    checkpoints = LayerCheckpoints(tmp_path / "a", 1, "k", S3CheckpointStore(f"s3://{bucket}/c", "job-1", client=flaky))
    checkpoints.take_over()
    compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=checkpoints)
    assert any("compress-layer-1" in key for key in puts)
    # layer 2's state never reached the store; layer 1's, complete, is what another machine would resume
    resume = LayerCheckpoints(tmp_path / "b", 2, "k", S3CheckpointStore(f"s3://{bucket}/c", "job-1",
                                                                        client=client)).take_over()
    assert resume is not None and (resume.walk, resume.done) == ("compress", 1)


@pytest.mark.parametrize("uri", ["bucket/prefix", "s3://", "s3:///prefix", "gs://bucket/p"])
def test_a_checkpoint_uri_must_name_a_bucket(uri):
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        parse_s3_uri(uri)
