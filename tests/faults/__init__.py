"""Fault injection into the processes a test starts (a worker): see sitecustomize.py for the format."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS_DIR = Path(__file__).resolve().parent


def fault_env(fault: str) -> dict[str, str]:
    """The environment that makes a child process load the fault, e.g.
    `celery_worker(settings, log, extra_env=fault_env("kill_at_layer=2,model=poison"))`."""
    path = [str(FAULTS_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {"SQUEEZE_TEST_FAULT": fault, "PYTHONPATH": os.pathsep.join(path)}
