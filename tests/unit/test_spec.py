"""The job spec: defaults, and each invalid spec answered 422 with the offending field named."""

from __future__ import annotations

import copy

import pytest
from fastapi.testclient import TestClient

from app.jobs.spec import JobSpec
from app.main import create_app
from app.settings import Settings

VALID = {
    "model": {"id": "HuggingFaceTB/SmolLM2-135M"},
    "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
    "calibration": {"dataset": "allenai/c4"},
}


def with_(path: str, value) -> dict:
    """VALID with one dotted path set (value None deletes the key)."""
    spec = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


# (case, spec, the field the error must name)
INVALID = [
    ("bits 5", with_("quantization.bits", 5), "quantization.bits"),
    ("bits as text", with_("quantization.bits", "four"), "quantization.bits"),
    ("unknown quant method", with_("quantization.method", "awq"), "quantization.method"),
    ("group size 100", with_("quantization.group_size", 100), "quantization.group_size"),
    ("group size 0", with_("quantization.group_size", 0), "quantization.group_size"),
    ("unknown top-level field", {**VALID, "priority": 3}, "priority"),
    ("unknown nested field", with_("quantization.bitz", 4), "quantization.bitz"),
    ("missing model", with_("model", None), "model"),
    ("empty model id", with_("model.id", ""), "model.id"),
    ("missing calibration", with_("calibration", None), "calibration"),
    ("num_samples 0", with_("calibration.num_samples", 0), "calibration.num_samples"),
    ("seq_len 8", with_("calibration.seq_len", 8), "calibration.seq_len"),
    ("2:4 with ratio", {**VALID, "sparsity": {"method": "sparsegpt", "pattern": "2:4", "ratio": 0.5}}, "sparsity"),
    ("sparsity without ratio or pattern", {**VALID, "sparsity": {"method": "wanda"}}, "sparsity"),
    ("ratio 1.5", {**VALID, "sparsity": {"method": "wanda", "ratio": 1.5}}, "sparsity.ratio"),
    ("pattern 4:2", {**VALID, "sparsity": {"method": "wanda", "pattern": "4:2"}}, "sparsity.pattern"),
    ("pattern garbage", {**VALID, "sparsity": {"method": "wanda", "pattern": "two of four"}}, "sparsity.pattern"),
    ("unknown pruning method", {**VALID, "sparsity": {"method": "random", "ratio": 0.5}}, "sparsity.method"),
    ("rank and budget", {**VALID, "compensation": {"method": "eora", "rank": 8, "rank_budget": {"params": 10}}},
     "compensation"),
    ("eora without rank", {**VALID, "compensation": {"method": "eora"}}, "compensation"),
    ("rank 0", {**VALID, "compensation": {"method": "eora", "rank": 0}}, "compensation.rank"),
    ("none with rank", {**VALID, "compensation": {"method": "none", "rank": 8}}, "compensation"),
    ("budget with both", {**VALID, "compensation": {"method": "eora", "rank_budget": {"params": 5, "fraction": 0.1}}},
     "compensation.rank_budget"),
    ("budget fraction 2", {**VALID, "compensation": {"method": "eora", "rank_budget": {"fraction": 2}}},
     "compensation.rank_budget.fraction"),
    ("budget floor -1", {**VALID, "compensation": {"method": "eora", "rank_budget": {"params": 5, "min_rank": -1}}},
     "compensation.rank_budget.min_rank"),
    ("adapter bits 3", {**VALID, "compensation": {"method": "eora", "rank": 8, "adapter_bits": 3}},
     "compensation.adapter_bits"),
    ("rank without compression", {"model": VALID["model"], "calibration": VALID["calibration"],
                                  "compensation": {"method": "eora", "rank": 8}}, "compensation"),
    ("nothing to do", {"model": VALID["model"], "calibration": VALID["calibration"]}, "quantization"),
    ("act_order with sparsegpt", {**VALID, "quantization": {"method": "gptq", "act_order": True},
                                  "sparsity": {"method": "sparsegpt", "pattern": "2:4"}}, "quantization.act_order"),
    ("eval windows 0", with_("evaluation.num_windows", 0), "evaluation.num_windows"),
    ("negative eora damp", {**VALID, "compensation": {"method": "eora", "rank": 8, "damp": -0.1}}, "compensation.damp"),
    ("infinite eora damp", {**VALID, "compensation": {"method": "eora", "rank": 8, "damp": "inf"}}, "compensation.damp"),
    ("negative sink tokens", {**VALID, "compensation": {"method": "eora", "rank": 8, "sink_tokens": -1}},
     "compensation.sink_tokens"),
    ("sink tokens fill the window", {**VALID, "calibration": {"dataset": "allenai/c4", "seq_len": 16},
                                     "compensation": {"method": "eora", "rank": 8, "sink_tokens": 16}},
     "compensation.sink_tokens"),
    ("refine with a rank budget", {**VALID, "compensation": {"method": "eora", "rank_budget": {"fraction": 0.1},
                                                             "refine": 2}}, "compensation"),
    ("refine 9 rounds", {**VALID, "compensation": {"method": "eora", "rank": 8, "refine": 9}}, "compensation.refine"),
    ("refine without compensation", {**VALID, "compensation": {"method": "none", "refine": 1}}, "compensation"),
    ("target with fixed bits", {**VALID, "target": {"bits_per_weight": 4}}, "quantization.bits and group_size"),
    ("target without quantization", {**with_("quantization", None), "sparsity": {"method": "wanda", "ratio": 0.5},
                                     "target": {"bits_per_weight": 4}}, "needs a quantization section"),
    ("target with a rank", {**with_("quantization", {"method": "rtn"}), "target": {"bits_per_weight": 4},
                            "compensation": {"method": "eora", "rank": 8}}, "compensation.rank"),
    ("target bits 0", {**with_("quantization", {"method": "rtn"}), "target": {"bits_per_weight": 0}},
     "target.bits_per_weight"),
    ("unknown engine", {**VALID, "target": {"engine": "tgi"}}, "target.engine"),
    ("vllm 3-bit", {**with_("quantization.bits", 3), "target": {"engine": "vllm"}}, "quantization.bits 3"),
    ("vllm adapter bits", {**VALID, "target": {"engine": "vllm"},
                           "compensation": {"method": "eora", "rank": 8, "adapter_bits": 4}}, "compensation.adapter_bits"),
    ("vllm rank 12", {**VALID, "target": {"engine": "vllm"}, "compensation": {"method": "eora", "rank": 12}},
     "compensation.rank"),
    ("no bits without a target", {**VALID, "quantization": {"method": "rtn", "bits": None}}, "quantization.bits"),
]


def test_a_size_target_leaves_bits_and_ranks_to_the_worker_and_survives_storage():
    spec = JobSpec.model_validate({**with_("quantization", {"method": "rtn"}), "compensation": {"method": "eora"},
                                   "target": {"bits_per_weight": 3.6, "engine": "vllm"}})
    assert (spec.quantization.bits, spec.quantization.group_size, spec.compensation.rank) == (None, None, None)
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # as the worker reads it back
    plain = JobSpec.model_validate(VALID | {"quantization": {"method": "rtn"}})
    assert (plain.quantization.bits, plain.quantization.group_size, plain.target) == (4, 128, None)
    assert JobSpec.model_validate(plain.model_dump(mode="json")) == plain


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("api"))
    with TestClient(create_app(settings, run_reaper=False)) as client:
        yield client


@pytest.mark.parametrize("case,spec,field", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_422_naming_the_field(client, case, spec, field):
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert field in body["detail"], body
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was stored


@pytest.mark.parametrize("compensation,field", [
    ({"method": "eora", "rank": 1024}, "compensation.rank"),
    ({"method": "eora", "rank_budget": {"params": 5, "min_rank": 1024}}, "compensation.rank_budget.min_rank"),
])
def test_ranks_above_the_servers_max_rank_are_422(client, compensation, field):
    """The bound is the server's Settings.max_rank (512 by default), not a number in the job spec."""
    response = client.post("/v1/jobs", json={**VALID, "compensation": compensation})
    assert response.status_code == 422, response.text
    assert response.json() == {"error": "invalid_spec", "detail": f"{field}: at most 512 on this server",
                               "fields": [field]}
    assert client.get("/v1/jobs").json()["items"] == []


def test_the_servers_max_rank_reaches_the_plan_and_bounds_its_ranks(tmp_path):
    from worker.errors import JobFailure
    from worker.job_plan import compression_plan

    small = Settings(data_dir=tmp_path, max_rank=8)
    budget = JobSpec.model_validate({**VALID, "compensation": {"rank_budget": {"params": 10**6, "min_rank": 8}}})
    assert compression_plan(budget, small.max_rank).compensation.max_rank == 8
    assert budget.compensation.above_max_rank(small.max_rank) is None
    fixed = JobSpec.model_validate({**VALID, "compensation": {"rank": 16}})
    assert fixed.compensation.above_max_rank(small.max_rank) == ("compensation.rank", "at most 8 on this server")
    with pytest.raises(JobFailure, match=r"^compensation.rank: at most 8 on this server$"):
        compression_plan(fixed, small.max_rank)  # `squeeze compress` has no submission check: the worker's
    with TestClient(create_app(small, run_reaper=False)) as small_client:
        response = small_client.post("/v1/jobs", json={**VALID, "compensation": {"rank": 16}})
    assert response.status_code == 422 and response.json()["detail"] == "compensation.rank: at most 8 on this server"


def test_the_plan_takes_the_job_specs_defaults():
    """One owner per default: the plan of a job that names nothing gets the job spec's values (EoRA
    damp 1.0, GPTQ act_order on, quantization.damp 0.01), the worker's dataclasses add none."""
    from worker.job_plan import compression_plan

    spec = JobSpec.model_validate({"model": {"id": "a/b"}, "quantization": {}, "calibration": {"dataset": "c/d"},
                                   "compensation": {"rank": 8}})
    plan = compression_plan(spec, 512)
    assert (plan.quant.method, plan.quant.bits, plan.quant.group_size, plan.quant.damp, plan.quant.act_order) == (
        "gptq", 4, 128, 0.01, True)
    c = plan.compensation
    assert (c.method, c.rank, c.damp, c.sink_tokens, c.adapter_bits, c.max_rank, c.refine) == (
        "eora", 8, 1.0, 0, None, 512, 0)


def test_defaults_are_documented_values():
    spec = JobSpec.model_validate({"model": {"id": "a/b"}, "quantization": {}, "calibration": {"dataset": "c/d"}})
    assert spec.model.revision == "main"
    assert (spec.quantization.method, spec.quantization.bits, spec.quantization.group_size) == ("gptq", 4, 128)
    assert spec.quantization.symmetric is False
    assert (spec.calibration.split, spec.calibration.text_field) == ("train", "text")
    assert (spec.calibration.num_samples, spec.calibration.seq_len, spec.calibration.seed) == (128, 512, 0)
    assert spec.destination.uri is None
    assert spec.compensation is None
    compensated = JobSpec.model_validate({**spec.model_dump(), "compensation": {"rank": 8}})
    assert (compensated.compensation.method, compensated.compensation.damp) == ("eora", 1.0)


@pytest.mark.parametrize(("quantization", "sparsity", "expected"), [
    ({"method": "gptq"}, None, True),
    ({}, None, True),  # method defaults to gptq
    ({"method": "rtn"}, None, False),
    ({"method": "gptq"}, {"method": "sparsegpt", "pattern": "2:4"}, False),
    ({"method": "gptq"}, {"pattern": "2:4"}, False),  # sparsity.method defaults to sparsegpt
    ({"method": "gptq"}, {"method": "wanda", "ratio": 0.5}, True),
    ({"method": "gptq", "act_order": False}, None, False),  # an explicit value is kept
])
def test_act_order_default_follows_method(quantization, sparsity, expected):
    body = {"model": {"id": "a/b"}, "quantization": quantization, "calibration": {"dataset": "c/d"}}
    if sparsity is not None:
        body["sparsity"] = sparsity
    assert JobSpec.model_validate(body).quantization.act_order is expected


def test_issue_example_spec_parses():
    spec = JobSpec.model_validate({
        "model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "main"},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": False},
        "sparsity": {"method": "sparsegpt", "pattern": "2:4"},
        "compensation": {"method": "eora", "rank": 64},
        "calibration": {"dataset": "allenai/c4", "split": "train", "text_field": "text",
                        "num_samples": 128, "seq_len": 512, "seed": 0},
        "destination": {"uri": "s3://bucket/prefix"},
    })
    assert spec.sparsity.nm == (2, 4)
    assert spec.compensation.rank == 64
