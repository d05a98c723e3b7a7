"""Benchmark rows record the code they ran on, and --fresh never reuses a row from an earlier run."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import common


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
