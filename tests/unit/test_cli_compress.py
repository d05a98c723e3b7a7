"""`squeeze compress`: flags override a spec file; a local run writes the model and prints metrics."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from app.cli import build_parser, main
from app.compress_args import spec_from_args
from worker.export.verify import load_export


def parse(*argv):
    return build_parser().parse_args(["compress", *argv])


def test_flags_override_the_spec_file(tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({
        "model": {"id": "org/model"},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 128},
        "calibration": {"dataset": "org/data", "num_samples": 64},
    }))
    spec = spec_from_args(parse("--spec", str(spec_file), "--out", str(tmp_path / "out"), "--bits", "3",
                                "--sparsity-method", "wanda", "--sparsity-pattern", "2:4", "--rank", "16"))
    assert spec.model.id == "org/model"
    assert (spec.quantization.method, spec.quantization.bits, spec.quantization.group_size) == ("gptq", 3, 128)
    assert spec.sparsity.nm == (2, 4) and spec.sparsity.method == "wanda"
    assert spec.compensation.rank == 16 and spec.compensation.method == "eora"
    assert spec.calibration.num_samples == 64
    assert spec.destination.uri == str((tmp_path / "out").resolve())


def test_positional_model_and_budget_flag(tmp_path):
    spec = spec_from_args(parse("some/model", "--out", str(tmp_path), "--quant-method", "rtn",
                                "--calibration", "c/d", "--rank-budget-fraction", "0.05", "--rank-budget-min-rank", "8"))
    assert spec.model.id == "some/model"
    assert spec.compensation.rank_budget.fraction == 0.05 and spec.compensation.rank is None
    assert spec.compensation.rank_budget.min_rank == 8


@pytest.mark.parametrize("flags", [["--rank-budget-min-rank", "8"],
                                   ["--rank-budget-params", "1000", "--rank-budget-fraction", "0.1"]])
def test_incomplete_or_double_budget_flags_are_refused(tmp_path, flags):
    with pytest.raises(ValidationError, match="exactly one of params or fraction"):
        spec_from_args(parse("a/b", "--out", str(tmp_path), "--quant-method", "rtn", "--calibration", "c/d", *flags))


def test_invalid_flag_combination_exits_2_naming_the_field(tmp_path, capsys):
    code = main(["compress", "a/b", "--out", str(tmp_path), "--bits", "5", "--calibration", "c/d"])
    assert code == 2
    assert "quantization.bits" in capsys.readouterr().err


def test_local_run_writes_a_quantized_model(tmp_path, tiny_model_dir, capsys):
    calibration = tmp_path / "cal.txt"
    from tests.fixtures_models import SAMPLE_DOCS

    calibration.write_text("\n\n".join(SAMPLE_DOCS * 3))
    out = tmp_path / "out"
    code = main(["compress", str(tiny_model_dir), "--out", str(out), "--quant-method", "rtn", "--bits", "4",
                 "--group-size", "32", "--calibration", str(calibration), "--num-samples", "8", "--seq-len", "32",
                 "--eval-windows", "4"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["perplexity_after"] != report["metrics"]["perplexity_before"]
    down = load_export(out).model.layers[1].mlp.down_proj.weight.detach()
    assert max(len(torch.unique(g)) for g in down.reshape(-1, 32)) <= 16
