"""Every job spec the documentation shows is one a user can submit and run.

Each ```json block holding a "model" key and each curl `-d '{...}'` body in README.md and docs/*.md
goes through JobSpec, the server's submit-time checks (embedded defaults) and, for the Hub models whose
layer widths are known here, the worker's pre-work rule: the quantization group size and the N:M
block must divide every Linear's input width (worker.job_plan.check_plan_fits).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.jobs.service import validate_for_server
from app.jobs.spec import JobSpec
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Input widths of the Linear layers of the models the documents name (from their config.json):
# SmolLM2-135M: hidden 576 (attention and up/gate projections), FFN 1536 (down_proj).
LINEAR_INPUT_WIDTHS = {"HuggingFaceTB/SmolLM2-135M": (576, 1536), "HuggingFaceTB/SmolLM2-135M-Instruct": (576, 1536)}


def documented_specs() -> list[tuple[str, dict]]:
    specs = []
    for document in DOCUMENTS:
        text = document.read_text()
        bodies = re.findall(r"```json\n(.*?)```", text, re.DOTALL) + re.findall(r"-d '(\{.*?\})'", text, re.DOTALL)
        for number, body in enumerate(bodies, start=1):
            spec = json.loads(body)
            if "model" in spec:
                specs.append((f"{document.name}#{number}", spec))
    return specs


SPECS = documented_specs()


def test_the_documents_show_job_specs():
    assert len(SPECS) >= 2 and {label.split("#")[0] for label, _ in SPECS} >= {"README.md"}


@pytest.mark.parametrize("label,spec", SPECS, ids=[label for label, _ in SPECS])
def test_documented_spec_is_accepted_and_fits_its_model(label, spec, tmp_path):
    job = JobSpec.model_validate(spec)
    validate_for_server(Settings(data_dir=tmp_path), job)
    widths = LINEAR_INPUT_WIDTHS.get(job.model.id)
    if widths is None:
        assert job.model.id.startswith("/"), f"{label}: add {job.model.id}'s Linear widths to LINEAR_INPUT_WIDTHS"
        return
    if job.quantization is not None and job.quantization.group_size not in (-1, None):  # None: a size target's
        assert all(w % job.quantization.group_size == 0 for w in widths), \
            f"{label}: group_size {job.quantization.group_size} does not divide {job.model.id}'s widths {widths}"
    if job.sparsity is not None and job.sparsity.nm is not None:
        assert all(w % job.sparsity.nm[1] == 0 for w in widths), f"{label}: N:M block does not divide {widths}"
