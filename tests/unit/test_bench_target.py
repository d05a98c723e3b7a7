"""bench.target's smoke path: the size-target harness end to end on a tiny random LLaMA in a temp folder."""

from __future__ import annotations

import json

import pytest

from bench import common, target
from worker.engines import VLLM_LORA_RANKS
from worker.export.sizes import SHAPE_BYTES


def test_the_smoke_run_meets_its_targets_and_splits_them_by_kind(tmp_path):
    docs = {path: path.stat().st_mtime_ns for path in common.RESULTS.rglob("*")}
    protocol = target.smoke_protocol(tmp_path)
    summary = target.run(protocol, [3.3, 5.5], ["transformers", "vllm"], "eora", tmp_path / "target.json")
    assert {path: path.stat().st_mtime_ns for path in common.RESULTS.rglob("*")} == docs  # nothing under docs/
    assert json.loads((tmp_path / "target.json").read_text()) == summary
    assert set(summary["rows"]) == {"target_3p3_transformers_eora", "target_5p5_transformers_eora",
                                    "target_5p5_vllm_eora"}
    assert "cannot be met" in summary["infeasible"]["target_3p3_vllm_eora"]  # vLLM: 4 bits at the least
    assert summary["baseline"]["name"] == target.BASELINE and summary["baseline"]["fixed_code"]
    for name, row in summary["rows"].items():
        run = json.loads((tmp_path / "runs" / f"{name}.json").read_text())
        weights, linears = run["bits"]["linear_weights"], len(run["modules"])
        assert row["bits"] == run["bits"]["total"] <= row["target"]
        # the bench's count and the planner's differ only by the weight_shape tensors the bench leaves out
        assert 0 <= row["planned_bits"] - row["bits"] <= 8 * SHAPE_BYTES * linears / weights + 1e-12
        kinds = row["by_kind"].values()
        assert sum(k["weights"] + k["adapters"] for k in kinds) == pytest.approx(row["bits"], rel=1e-12)
        assert sum(k["share_weights"] + k["share_adapters"] for k in kinds) == pytest.approx(row["bits"] / row["target"])
        assert all(sum(k[count].values()) == 2 for k in kinds for count in ("bits", "group_size", "rank"))  # 2 layers
        assert run["stages"]["planning"] == row["seconds"]["planning"] > 0 and row["sensitivity"] == "fisher"
        assert row["seconds"]["compression"] == run["compress_wall_seconds"]
        parts = row["seconds"]["planning_parts"]
        assert parts == run["planning"]["part_seconds"] and sum(parts.values()) <= row["seconds"]["planning"]
        assert set(parts) == {"sensitivity", "forward", "measurement", "allocation"}
        assert row["cost_ratio_own_compression"] == pytest.approx(1 + row["seconds"]["planning"] / run["compress_wall_seconds"])
        assert row["checks"]["job time at most 1.5x its own compression's"] == (row["cost_ratio_own_compression"] <= 1.5)
        assert target.GGUF_GROUP not in run["planning"]["size_target"]["group_sizes"]
        assert run["planning"]["base_plan"]["quant"]["act_order"] and run["planning"]["base_plan"]["quant"]["damp"] == 0.01
        assert run["plan"]["compensation"]["damp"] == 1.0
        # each adapter at the precision the plan chose for it (run["bits"], within planned_bits above, counts it so)
        precisions = {n: m["adapter_bits"] for n, m in run["planning"]["modules"].items() if run["modules"][n]["rank"]}
        assert {n: run["modules"][n]["adapter_bits"] for n in precisions} == precisions
        assert sum(n for k in kinds for n in k["adapter_bits"].values()) == len(precisions)
        assert set(run["planning"]["size_target"]["adapter_bits"]) == ({None} if row["engine"] == "vllm" else {None, 8, 4})
        fixed = row["best_fixed"]["evaluation"]
        assert (fixed is None) == (row["target"] < 4.3125)  # the baseline, 4-bit g64, is the only fixed row
        assert (row["checks"]["beats the best fixed row on evaluation"] is None) == (fixed is None)
        if row["engine"] == "vllm":
            assert {b for k in kinds for b in k["bits"]} <= {"4", "8"}
            assert {int(r) for k in kinds for r in k["rank"]} <= {0, *VLLM_LORA_RANKS}


def test_target_rows_are_drawn_unjoined_and_tabled(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from bench import plot

    summary = target.run(target.smoke_protocol(tmp_path), [4.0, 6.0], ["transformers", "vllm"], "none",
                         tmp_path / "target.json", refresh=True)
    refreshed = {"gptq4_g64", "rtn4_g64", "gptq3_g64", "rtn3_g64", "sparsegpt_2of4_gptq4_g64", "gptq4_g64_actorder",
                 "gptq4_g64_damp10", "gptq3_g64_actorder"}  # bench.quality's rows at <= 6 bits (2:4 alone: 9)
    assert {path.stem for path in (tmp_path / "runs").glob("*.json")} - set(summary["rows"]) == refreshed
    best = summary["rows"]["target_6p0_transformers_none"]["best_fixed"]
    assert best["evaluation"]["name"] in refreshed and best["validation"]["name"] in refreshed
    monkeypatch.setattr(common, "RUNS", tmp_path / "runs")
    fig, ax = plt.subplots()
    plot.draw_targets(ax, lambda run: 1.0)
    points = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert len(points) == len(ax.get_lines()) == 3  # one point each, no line joining them
    assert sorted(line.get_label() for line in points if not line.get_label().startswith("_")) == [
        "size target, engine transformers, compensation none", "size target, engine vllm, compensation none"]
    plt.close(fig)
    table = plot.target_table(summary)
    assert [line.split(" |")[0] for line in table[4:]] == [
        "| target_4p0_transformers_none", "| target_6p0_transformers_none", "| target_6p0_vllm_none",
        "| target_4p0_vllm_none"]
    assert "cannot be met" in table[-1]
    # planning: total (sensitivity / forward / measurement)
    for line, row in zip(table[4:7], summary["rows"].values(), strict=True):
        parts = row["seconds"]["planning_parts"]
        assert f"| {row['seconds']['planning']:.0f} ({parts['sensitivity']:.0f} / {parts['forward']:.0f} / " \
               f"{parts['measurement']:.0f}) | {row['seconds']['compression']:.0f} |" in line


def test_a_curve_windows_row_is_a_diagnostic_planned_on_that_many_windows(tmp_path, monkeypatch):
    from worker import target as planning

    read: list[int] = []
    real = planning.capture_inputs

    def capture(source, windows, *args):
        read.append(windows.shape[0])
        return real(source, windows, *args)

    monkeypatch.setattr(planning, "capture_inputs", capture)
    protocol = target.smoke_protocol(tmp_path)
    row = target.run_target(protocol, 5.5, "transformers", "eora", curve_windows=3)
    assert read == [3] and protocol.calibration.shape[0] > 3
    assert row["name"] == "diag_target_5p5_transformers_eora_curves3"
    assert (tmp_path / "runs" / "diag_target_5p5_transformers_eora_curves3.json").exists()
    assert target.summarize(protocol, {})["rows"] == {}  # diagnostics stay out of the summary
