"""bench/gpu_check.py --smoke: the GPU check's code runs end to end on the CPU (tiny sizes), so the
first session with a GPU can run it in one call. Never writes docs/bench/gpu_check.json."""

from __future__ import annotations

import json

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
    large = report["large_job"]
    assert large["timings_seconds"]["compress_s"] > 0 and large["max_rank"] == 8
    assert len(large["layer_seconds"]) == report["models"]["large"]["num_hidden_layers"]
    assert large["peak_host_rss_bytes"] > 0 and large["peak_device_bytes"] is None
    assert (gpu_check.RESULT.read_bytes() if gpu_check.RESULT.exists() else None) == before
