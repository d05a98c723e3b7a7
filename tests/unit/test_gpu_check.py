"""bench/gpu_check.py --smoke: the GPU check's code runs end to end on the CPU (tiny sizes), so the
first session with a GPU can run it in one call. Never writes docs/bench/gpu_check.json."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

import pytest

from bench import gpu_check


def test_the_smoke_run_measures_every_part_and_writes_only_where_told(tmp_path):
    before = gpu_check.RESULT.read_bytes() if gpu_check.RESULT.exists() else None
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    cpu, other = report["small_jobs"]
    assert cpu["device"] == other["device"] == "cpu"  # smoke: the "cuda" job runs on the CPU too
    assert report["cpu_vs_cuda"]["relative_logit_diff"] == 0.0 and report["cpu_vs_cuda"]["passes"]
    assert set(report["speed_ratio_cpu_over_cuda"]["timings"]) == set(cpu["timings_seconds"])
    assert [job["mode"] for job in report["small_jobs"]] == [{"stream_layers": True, "compute_dtype": "float32"}] * 2
    large = report["large_jobs"]
    assert [(job["mode"]["stream_layers"], job["mode"]["compute_dtype"]) for job in large] == [
        (True, "float32"), (False, "float32"), (True, "bfloat16")]
    for job in large:  # each mode is what the pipeline ran, not just a label
        assert job["memory"]["streamed"] == job["mode"]["stream_layers"]
        assert job["memory"]["compute_dtype"] == job["mode"]["compute_dtype"]
        assert job["memory"]["activations"] in {"device", "host", "disk"}
        assert job["timings_seconds"]["compress_s"] > 0 and job["max_rank"] == 8
        assert len(job["layer_seconds"]) == report["models"]["large"]["num_hidden_layers"]
        assert job["peak_host_rss_bytes"] >= job["host_rss_at_start_bytes"] > 0 and job["peak_device_bytes"] is None
    # the same model and data: streamed and whole-model fp32 jobs give the same perplexity
    assert large[0]["perplexity_after"] == pytest.approx(large[1]["perplexity_after"], rel=1e-6)
    assert (gpu_check.RESULT.read_bytes() if gpu_check.RESULT.exists() else None) == before


def test_a_large_job_the_budget_cannot_hold_is_skipped_and_the_json_follows_each_job(tmp_path, monkeypatch):
    walls = iter([100.0, 300.0])
    monkeypatch.setattr(gpu_check, "run_job", lambda name, spec, device, mode, work: {
        "name": name, "mode": asdict(mode), "wall_seconds": next(walls)})
    written: list[list[str]] = []
    monkeypatch.setattr(gpu_check, "write", lambda report, out: written.append(
        [job["name"] for job in report["large_jobs"]]))
    report: dict = {"large_jobs": []}

    gpu_check.large_jobs(report, tmp_path / "gpu_check.json", None, "cuda",
                         [gpu_check.STREAMED, gpu_check.WHOLE, gpu_check.STREAMED_BF16], tmp_path,
                         started=time.perf_counter() - 200, budget=350)

    # 200 s spent: + 100 s (streamed) fits 350, + 300 s (whole) does not
    names = ["large-cuda-streamed", "large-cuda-whole", "large-cuda-streamed-bfloat16"]
    assert written == [names[:1], names[:2], names]
    skipped = report["large_jobs"][2]
    assert skipped["mode"] == {"stream_layers": True, "compute_dtype": "bfloat16"} and "wall_seconds" not in skipped
    assert re.fullmatch(r"20\d s spent \+ 300 s \(the previous large job\) would pass --budget-seconds 350",
                        skipped["skipped"])
