"""Faults a test injects into a worker process, with no hook in production code.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one: a process
whose PYTHONPATH starts with tests/faults (tests.faults.fault_env builds that environment) loads this
module. It does nothing unless SQUEEZE_TEST_FAULT is set; then it wraps worker functions as they are
imported (the Celery main process installs the wrappers, and the prefork children inherit them).

SQUEEZE_TEST_FAULT holds comma-separated key=value pairs:

    kill_at_layer=K   SIGKILL the process while it compresses decoder layer K (1-based): layers
                      1..K-1 are done and reported (the job reads "layer K-1 of n"), layer K is on
                      the device, half done.
    slow_linear=S     sleep S seconds before compressing each Linear (a long layer, e.g. to cancel
                      inside one). One of kill_at_layer and slow_linear is required.
    model=TEXT        only jobs whose spec's model.id contains TEXT (default: every job).
    max_attempt=N     only the job's attempts 1..N (default: every attempt); 1 kills the first
                      attempt and lets the retry run, e.g. to test a resume.

    SQUEEZE_TEST_FAULT="kill_at_layer=2,model=poison"          every attempt of a "poison" model dies
    SQUEEZE_TEST_FAULT="kill_at_layer=3,max_attempt=1"         the first attempt of any job dies
    SQUEEZE_TEST_FAULT="slow_linear=2"                         every layer takes 7 x 2 s longer

SIGKILL of a prefork child: the Celery main process logs "exited with 'signal 9 (SIGKILL)'", acknowledges
the message (task_reject_on_worker_lost is off), starts a new child and takes the next message; the
job stays running until its lease expires and the reaper requeues it. An unknown key or a bad value
raises at start-up, so a typo fails the worker instead of silently injecting nothing.
"""

from __future__ import annotations

import importlib.abc
import os
import signal
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kill_at_layer: int | None = None
    slow_linear: float | None = None
    model: str | None = None
    max_attempt: int | None = None

    def applies(self, model_id: str, attempt: int) -> bool:
        return (self.model is None or self.model in model_id) and (self.max_attempt is None or attempt <= self.max_attempt)


def parse_fault(text: str) -> Fault:
    values: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, value = pair.strip().partition("=")
        if not sep or key not in Fault.__dataclass_fields__:
            raise ValueError(f"SQUEEZE_TEST_FAULT: {pair!r} is not one of kill_at_layer=K, slow_linear=S, "
                             "model=TEXT, max_attempt=N")
        values[key] = value
    if "kill_at_layer" not in values and "slow_linear" not in values:
        raise ValueError("SQUEEZE_TEST_FAULT: kill_at_layer=K or slow_linear=S is required")
    return Fault(kill_at_layer=int(values["kill_at_layer"]) if "kill_at_layer" in values else None,
                 slow_linear=float(values["slow_linear"]) if "slow_linear" in values else None,
                 model=values.get("model"), max_attempt=int(values["max_attempt"]) if "max_attempt" in values else None)


class _State:
    armed = False  # inside run_pipeline of a job the fault applies to
    compressing = False  # inside compress_model (forward_layer also serves the evaluation)


def _patch_pipeline(module, fault: Fault) -> None:
    run_pipeline = module.run_pipeline

    def faulty_run_pipeline(job_id, spec, settings, reporter, *args, **kwargs):
        _State.armed = fault.applies(spec.model.id, reporter.attempt)
        try:
            return run_pipeline(job_id, spec, settings, reporter, *args, **kwargs)
        finally:
            _State.armed = False

    module.run_pipeline = faulty_run_pipeline


def _patch_sequential(module, fault: Fault) -> None:
    compress_model, forward_layer = module.compress_model, module.forward_layer

    def faulty_compress_model(*args, **kwargs):
        _State.compressing = True
        try:
            return compress_model(*args, **kwargs)
        finally:
            _State.compressing = False

    def faulty_forward_layer(layer, inputs, index, *args, **kwargs):
        if _State.armed and _State.compressing and fault.kill_at_layer is not None and index == fault.kill_at_layer - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return forward_layer(layer, inputs, index, *args, **kwargs)

    module.compress_model, module.forward_layer = faulty_compress_model, faulty_forward_layer
    if fault.slow_linear is not None:
        compress_weight = module.compress_weight

        def slow_compress_weight(*args, **kwargs):
            if _State.armed:
                time.sleep(fault.slow_linear)
            return compress_weight(*args, **kwargs)

        module.compress_weight = slow_compress_weight


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs patches[name](module) right after the module `name` is first executed."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module, patch = spec.loader.exec_module, self.patches[name]

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("SQUEEZE_TEST_FAULT"):
    try:
        _fault = parse_fault(os.environ["SQUEEZE_TEST_FAULT"])
    except ValueError as exc:  # site.py would print an exception and go on; a bad fault must stop the process
        raise SystemExit(str(exc)) from None
    sys.meta_path.insert(0, _PatchOnImport({
        "worker.pipeline": lambda module: _patch_pipeline(module, _fault),
        "worker.sequential": lambda module: _patch_sequential(module, _fault),
    }))
