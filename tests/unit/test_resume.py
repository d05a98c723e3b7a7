"""Layer checkpoints: a run stopped after any layer and resumed by a new attempt ends bit for bit where an
undisturbed run ends (weights, codes, adapters, reports, notes), for one-walk and two-walk (budget) plans."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import worker.resume as resume_module
from tests.interrupts import Stop, stop_after
from tests.same_run import assert_same_run
from tests.specs import MIXED_ADAPTER_BITS, compensation, quant, sparsity
from worker.errors import LostOwnership
from worker.plan import CompressionPlan
from worker.resume import STATE_NAME, LayerCheckpoints
from worker.sequential import compress_model

CPU = torch.device("cpu")
GPTQ3 = quant(method="gptq", bits=3, group_size=32)
PLANS = {
    "gptq3 + eora r8, 4-bit adapters": CompressionPlan(
        quant=GPTQ3, compensation=compensation(rank=8, adapter_bits=4, adapter_group_size=32)),
    "gptq3 + eora r8, fp16/4/8-bit adapters per module (a size target's)": CompressionPlan(
        quant=GPTQ3, compensation=compensation(rank=8, adapter_bits=4, adapter_group_size=32),
        module_adapter_bits=MIXED_ADAPTER_BITS),
    "2:4 sparsegpt + gptq4": CompressionPlan(quant=quant(method="gptq", bits=4, group_size=32),
                                             sparsity=sparsity(method="sparsegpt", n=2, m=4)),
    "gptq3 + eora budget (two walks)": CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=5000)),
    "rtn4 + svd r512 (capped, with notes)": CompressionPlan(quant=quant(method="rtn", bits=4, group_size=32),
                                                            compensation=compensation(method="svd", rank=512)),
}


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_a_resumed_run_ends_where_an_undisturbed_one_does(plan_name, tiny_llama, calibration_windows, tmp_path):
    plan = PLANS[plan_name]
    fresh = copy.deepcopy(tiny_llama)
    reference_model = copy.deepcopy(tiny_llama)
    reference = compress_model(reference_model, calibration_windows, plan, CPU, batch_size=3)
    layers = len(tiny_llama.model.layers)
    steps = layers * (2 if plan.uses_budget else 1)  # layer reports of a whole run
    for stopped_after in range(1, steps + 1):  # every layer boundary, the last one included
        job_dir = tmp_path / f"stop{stopped_after}"
        first = LayerCheckpoints(job_dir, attempt=1, key="k")
        assert first.take_over() is None
        interrupted = copy.deepcopy(fresh)
        with pytest.raises(Stop):
            compress_model(interrupted, calibration_windows, plan, CPU, batch_size=3, checkpoints=first,
                           on_layer=stop_after(stopped_after))
        second = LayerCheckpoints(job_dir, attempt=2, key="k")
        resume = second.take_over()
        assert resume is not None
        assert (resume.walk, resume.done) == (("compress", stopped_after) if stopped_after <= layers
                                              else ("compensate", stopped_after - layers))
        reports = []
        model = copy.deepcopy(fresh)
        result = compress_model(model, calibration_windows, plan, CPU, batch_size=3, checkpoints=second,
                                resume=resume, on_layer=reports.append)
        assert [r.step for r in reports] == list(range(stopped_after + 1, steps + 1))
        assert_same_run(model, result, reference_model, reference)
        # one file per layer and no activations left after the last layer; the first attempt's folder is gone
        assert sorted(p.name for p in job_dir.iterdir()) == ["attempt-2"]
        walk = "compensate" if plan.uses_budget else "compress"
        assert sorted(p.name for p in (job_dir / "attempt-2").iterdir()) == sorted(
            [STATE_NAME] + [f"{walk}-layer-{i}.safetensors" for i in range(layers)])


def test_a_state_of_another_run_is_discarded(tiny_llama, calibration_windows, tmp_path):
    plan = PLANS["2:4 sparsegpt + gptq4"]
    first = LayerCheckpoints(tmp_path, attempt=1, key="spec A")
    first.take_over()
    with pytest.raises(Stop):
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=first,
                       on_layer=stop_after(1))
    assert json.loads((tmp_path / "attempt-1" / STATE_NAME).read_text())["done"] == 1
    assert LayerCheckpoints(tmp_path, attempt=2, key="spec B").take_over() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt-2"]
    assert list((tmp_path / "attempt-2").iterdir()) == []


def test_a_stale_attempt_cannot_write_into_the_state_a_newer_one_took_over(tiny_llama, calibration_windows, tmp_path):
    plan = PLANS["2:4 sparsegpt + gptq4"]
    stale = LayerCheckpoints(tmp_path, attempt=1, key="k")
    stale.take_over()
    with pytest.raises(Stop):
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=stale,
                       on_layer=stop_after(1))
    newer = LayerCheckpoints(tmp_path, attempt=2, key="k")
    resume = newer.take_over()
    assert resume is not None and resume.done == 1
    with pytest.raises(LostOwnership):  # the stale worker's next layer
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=stale)
    state = json.loads((tmp_path / "attempt-2" / STATE_NAME).read_text())
    assert (state["walk"], state["done"]) == ("compress", 1)


def test_the_state_survives_a_crash_between_its_files(tiny_llama, calibration_windows, tmp_path, monkeypatch):
    """A crash after layer 2's tensors are written but before its state is committed resumes at layer 2."""
    plan = PLANS["gptq3 + eora r8, 4-bit adapters"]
    first = LayerCheckpoints(tmp_path, attempt=1, key="k")
    first.take_over()
    writes = []
    write = resume_module._write_atomically

    def crash_on_second_state(path, data):
        writes.append(path.name)
        if len(writes) == 2:
            raise Stop("killed while committing layer 2")
        write(path, data)

    monkeypatch.setattr(resume_module, "_write_atomically", crash_on_second_state)
    with pytest.raises(Stop):
        compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, checkpoints=first)
    monkeypatch.undo()
    resume = LayerCheckpoints(tmp_path, attempt=2, key="k").take_over()
    assert (resume.walk, resume.done, resume.layers) == ("compress", 1, {0: "compress-layer-0.safetensors"})
    assert resume.inputs == "compress-inputs-1.safetensors"
    hidden = resume.hidden()
    assert hidden is not None and all(math.isfinite(float(h.abs().sum())) for h in hidden)
