"""A size-target job end to end (`squeeze compress`, i.e. run_pipeline), streamed and held whole: its
stored Linear bits, summed from the artifact's tensors, are the planned bytes and within the target; the
plan is on the job and in the manifest; an impossible target fails before any work, naming the smallest
size."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from tests.fixtures_models import SAMPLE_DOCS, TINY_DIMS
from worker.export.sizes import module_bytes


def compress(tmp_path, model_dir, target, monkeypatch, streamed):
    from app.cli import main

    calibration = tmp_path / "cal.txt"
    calibration.write_text("\n\n".join(SAMPLE_DOCS * 3))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": {"id": str(model_dir)}, "quantization": {"method": "gptq"},
                                "compensation": {"method": "eora"}, "target": target,
                                "calibration": {"dataset": str(calibration), "num_samples": 8, "seq_len": 32},
                                "evaluation": {"num_windows": 4}}))
    monkeypatch.setenv("SQUEEZE_STREAM_LAYERS", str(streamed).lower())
    monkeypatch.setenv("SQUEEZE_DATA_DIR", str(tmp_path / "data"))
    return main(["compress", "--spec", str(spec), "--out", str(tmp_path / "out")])


def file_tensor_bytes(path, keep=lambda key: True) -> int:
    with safe_open(path, "pt") as f:
        return sum(f.get_tensor(key).numel() * f.get_tensor(key).element_size() for key in f.keys() if keep(key))


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_target_jobs_files_hold_the_planned_bits(streamed, tmp_path, tiny_model_dir, monkeypatch, capsys):
    assert compress(tmp_path, tiny_model_dir, {"bits_per_weight": 4.0}, monkeypatch, streamed) == 0
    report = json.loads(capsys.readouterr().out)
    metrics, out = report["metrics"], tmp_path / "out"
    target = metrics["target"]
    modules = metrics["compression"]["per_module"]
    weights = metrics["size"]["linear_weights"]
    assert target["sensitivity"] == ("uniform" if streamed else "fisher")
    parts = target["part_seconds"]  # the planning's parts, timed: no backward pass for a streamed model
    assert set(parts) == {"sensitivity", "forward", "measurement", "allocation"}
    assert parts["forward"] > 0 and parts["measurement"] > 0 and (parts["sensitivity"] > 0) is not streamed
    assert sum(parts.values()) <= target["seconds"]
    linear = file_tensor_bytes(out / "model.safetensors", lambda key: key.rpartition(".")[0] in modules)
    assert linear == sum(sum(parts.values()) for parts in module_bytes(out, modules).values())
    # One adapter file: PEFT's when every adapter is fp16, else the quantized form (a job offers fp16, 8 and 4 bits).
    adapter_files = sorted((out / "adapter").glob("*.safetensors")) if (out / "adapter").is_dir() else []
    assert len(adapter_files) <= 1
    adapter = sum(file_tensor_bytes(path) for path in adapter_files)
    assert linear + adapter == target["planned_bytes"] <= target["budget_bytes"] == math.floor(4.0 * weights / 8)
    assert 8 * (linear + adapter) / weights <= 4.0 and metrics["size"]["bits_per_weight_stored"] <= 4.0
    # The plan per module: on the job, in the manifest, and what was compressed.
    manifest = json.loads((out / "squeeze.json").read_text())
    for name, chosen in target["modules"].items():
        width = TINY_DIMS["intermediate_size" if name.endswith("down_proj") else "hidden_size"]
        assert (modules[name]["bits"], modules[name]["rank"]) == (chosen["bits"], chosen["rank"]), name
        assert modules[name]["adapter_bits"] == manifest["modules"][name]["adapter_bits"] == chosen["adapter_bits"]
        assert chosen["adapter_bits"] in ((None, 8, 4) if chosen["rank"] else (None,)), name
        assert chosen["group_size"] in (64, 128, -1)  # never 32 (job_plan.TARGET_GROUP_SIZES)
        assert modules[name]["group_size"] == (width if chosen["group_size"] == -1 else chosen["group_size"]), name
        assert (manifest["modules"][name]["bits"], manifest["modules"][name]["rank"]) == (chosen["bits"],
                                                                                          chosen["rank"])
    assert len({(m["bits"], m["group_size"]) for m in target["modules"].values()}) > 1


def test_an_impossible_target_fails_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import worker.target

    def no_work(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(worker.target, "measure_options", no_work)
    assert compress(tmp_path, tiny_model_dir, {"bits_per_weight": 1.0}, monkeypatch, True) == 1
    captured = capsys.readouterr()
    printed = " ".join((captured.out + captured.err).split())  # the console wraps long lines
    assert "target.bits_per_weight 1 cannot be met: the smallest plan stores" in printed
    assert "bits per weight" in printed and not (tmp_path / "out").exists()
