"""Compression specs for tests, built the way a job builds them: through the job spec (app/jobs/spec.py,
the one owner of the defaults) and worker.job_plan.compression_plan. A test names what it cares about;
every other value is what a user gets. Knobs the job spec does not have (block sizes, adapter group
size, SparseGPT's own damp) and values it refuses (tests of the math's own checks) are set on the
result with dataclasses.replace.
"""

from __future__ import annotations

from dataclasses import replace

from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec
from worker.job_plan import compression_plan
from worker.plan import CompressionPlan

MAX_RANK = Settings.model_fields["max_rank"].default  # the server's default limit


def job_plan(**sections) -> CompressionPlan:
    """The plan of a job with these spec sections (quantization=..., sparsity=..., compensation=...)."""
    spec = JobSpec.model_validate({"model": {"id": "tiny"}, "calibration": {"dataset": "calibration.txt"}, **sections})
    return compression_plan(spec, MAX_RANK)


def _split(fields: dict, extra_names: tuple[str, ...]) -> tuple[dict, dict]:
    extra = {name: fields.pop(name) for name in extra_names if name in fields}
    return fields, extra


def quant(**fields) -> QuantSpec:
    fields, extra = _split(fields, ("block_size",))
    return replace(job_plan(quantization=fields).quant, **extra)


def sparsity(**fields) -> SparsitySpec:
    fields, extra = _split(fields, ("block_size", "damp"))
    n, m = fields.pop("n", None), fields.pop("m", None)
    if n is not None:
        fields["pattern"] = f"{n}:{m}"
    return replace(job_plan(sparsity=fields).sparsity, **extra)


def compensation(**fields) -> CompensationSpec:
    """budget_params / budget_fraction / min_rank / budget_criterion go into rank_budget."""
    fields, extra = _split(fields, ("adapter_group_size",))
    budget = {key: fields.pop(name) for name, key in (("budget_params", "params"), ("budget_fraction", "fraction"),
                                                        ("min_rank", "min_rank"), ("budget_criterion", "criterion"))
              if name in fields}
    if budget:
        fields["rank_budget"] = budget
    return replace(job_plan(quantization={}, compensation=fields).compensation, **extra)


# A size target's kind of plan: adapters per module in fp16 (None), 8 or 4 bits; the modules not named take
# the compensation's adapter_bits. Names of the tiny models' Linears (tests/fixtures_models).
MIXED_ADAPTER_BITS = {"model.layers.0.mlp.down_proj": 8, "model.layers.0.self_attn.v_proj": None,
                      "model.layers.1.self_attn.q_proj": None}
