"""Benchmark rows record the code they ran on, and --fresh never reuses a row from an earlier run."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import common, sizes


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(common, "_written", set())
    yield tmp_path / "runs"
    common.set_fresh(False)


def test_provenance_names_the_commit_and_the_versions():
    record = common.provenance()
    head = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert record["commit"] == head and len(head) == 40
    assert isinstance(record["dirty"], bool)
    import compressed_tensors
    import peft
    import torch
    import transformers

    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["versions"]["compressed-tensors"] == compressed_tensors.__version__
    assert record["versions"]["peft"] == peft.__version__


def test_fresh_reuses_only_rows_this_process_wrote(runs):
    common._write(runs / "old_row.json", {"name": "old_row", "ppl": 1.0})
    assert common.reusable_run("old_row") == {"name": "old_row", "ppl": 1.0}  # default: resume from files
    common.set_fresh(True)
    assert common.reusable_run("old_row") is None  # --fresh: rerun it
    assert common.load_run("old_row")["ppl"] == 1.0  # summaries still read every stored row
    common._write(runs / "new_row.json", {"name": "new_row", "ppl": 2.0})
    common._written.add("new_row.json")  # what run_config records after writing a row
    assert common.reusable_run("new_row")["ppl"] == 2.0
    assert json.loads((runs / "new_row.json").read_text())["ppl"] == 2.0


def test_rows_are_told_apart_by_whether_their_code_has_the_fix(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    commits = []
    for message in ("before", "the fix", "after"):
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", message)
        commits.append(git("rev-parse", "HEAD"))
    before, fix, after = commits

    def fixed(run: dict) -> bool:
        return common.on_fixed_code(run, fixes=fix, repo=tmp_path)

    assert fixed({"provenance": {"commit": after}}) and fixed({"provenance": {"commit": fix}})
    assert not fixed({"provenance": {"commit": before}})
    assert not fixed({"ppl": 1.0})  # no provenance: from before it was recorded
    with pytest.raises(RuntimeError, match="cannot compare"):
        fixed({"provenance": {"commit": "0" * 40}})


def test_pareto_front_keeps_only_undominated_points():
    from bench.plot import pareto_front

    points = [(4.3, 24.8), (3.3, 44.2), (6.2, 28.8), (4.0, 34.5), (3.3, 60.4), (8.4, 20.8)]
    assert pareto_front(points) == [(3.3, 44.2), (4.0, 34.5), (4.3, 24.8), (8.4, 20.8)]


def _result(adapter_bytes: dict[str, int]):
    from worker.plan import CompressionResult, ModuleReport

    return CompressionResult(modules={name: ModuleReport(name=name, shape=(0, 0), quantized=None, sparsity=None,
                                                         zero_fraction=0.0, error_before=0.0, compress_seconds=0.0,
                                                         adapter_params=n // 2, adapter_bytes=n)
                                      for name, n in adapter_bytes.items()})


SHAPES = {"model.layers.0.self_attn.q_proj": (64, 128), "model.layers.0.mlp.down_proj": (64, 64)}


def test_bits_count_each_modules_own_quantizer_and_adapter():
    from dataclasses import replace

    from worker.plan import CompressionPlan

    q, down = SHAPES
    g64 = common.quant("gptq", 4)
    uniform = sizes.bits_per_weight(CompressionPlan(quant=g64), SHAPES, None)
    assert uniform["total"] == 4 + (16 + 4) / 64  # one quantizer: its bits exactly (4.3125)
    per_channel8 = replace(g64, bits=8, group_size=-1)
    mixed = CompressionPlan(quant=g64, module_quant={down: per_channel8}, compensation=common.compensation(
        "eora", rank=8), module_rank={q: 8, down: 0})
    result = _result({q: 2 * 8 * (64 + 128), down: 0})
    bits = sizes.bits_per_weight(mixed, SHAPES, result)
    weights = 64 * 128 + 64 * 64
    assert bits["codes"] == pytest.approx((64 * 128 * 4 + 64 * 64 * 8) / weights, rel=1e-12)
    # per channel: one fp16 scale and an 8-bit zero point per row of 64 weights
    assert bits["scales_zeros"] == pytest.approx((64 * 128 * 20 / 64 + 64 * 64 * 24 / 64) / weights, rel=1e-12)
    assert bits["adapters"] == pytest.approx(8 * 2 * 8 * (64 + 128) / weights, rel=1e-12)
    kinds = sizes.bits_by_kind(mixed, SHAPES, result)
    assert kinds["down_proj"] == pytest.approx({"linear_weights": 64 * 64, "adapters": 0.0,
                                                "weights": 64 * 64 * (8 + 24 / 64) / weights})
    assert sum(k["weights"] + k["adapters"] for k in kinds.values()) == pytest.approx(bits["total"], rel=1e-12)
    symmetric = CompressionPlan(quant=replace(g64, symmetric=True))
    assert sizes.bits_per_weight(symmetric, SHAPES, None)["scales_zeros"] == 16 / 64  # no zero points


def test_plans_with_per_module_choices_are_stored_as_json():
    from worker.plan import CompressionPlan

    q, down = SHAPES
    plan = CompressionPlan(quant=common.quant("gptq", 4), module_quant={down: common.quant("rtn", 8)},
                           compensation=common.compensation("eora", rank=16, adapter_bits=4), module_rank={q: 16, down: 8},
                           module_adapter_bits={down: None})
    stored = json.loads(json.dumps(common.plan_to_dict(plan)))
    assert stored["module_quant"] == {down: {**stored["quant"], "method": "rtn", "bits": 8}}
    assert stored["module_rank"] == {q: 16, down: 8}
    assert stored["compensation"]["adapter_bits"] == 4 and stored["module_adapter_bits"] == {down: None}
    assert stored["compensation"]["rank"] == 16 and stored["sparsity"] is None


def test_diagnostic_counts_leave_out_pairs_with_a_pre_fix_side(runs, monkeypatch):
    from bench import plot

    monkeypatch.setattr(common, "on_fixed_code", lambda run: run["fixed"])
    rows = {"gptq3_g64__svd_r16": (30.0, True), "gptq3_g64__eora_r16": (29.0, True),  # counted: EoRA wins
            "gptq3_g64__svd_r64": (20.0, True), "gptq3_g64__eora_r64": (21.0, False)}  # a pre-fix side
    for name, (ppl, fixed) in rows.items():
        common._write(runs / f"diag_x_{name}.json", {"name": name, "ppl": ppl, "fixed": fixed})
    lines, shown = plot.diagnostic_grid("diag_x_", None)
    assert shown == set(rows)
    assert "| GPTQ 3-bit g64 | - | 30.00 | 29.00 | 20.00 | 21.00* | - |" in lines
    assert lines[-1] == ("diagnostic rows on the fixed code: EoRA beats SVD: 1 of 1; "
                         "EoRA beats SVD: 1 pair(s) with a pre-fix side, not counted")
