"""The fault-injection format of tests/faults (what other tests rely on to kill a worker where they mean to)."""

from __future__ import annotations

import pytest

from tests.faults.sitecustomize import Fault, parse_fault


def test_a_fault_names_the_layer_and_optionally_the_model_and_the_attempts():
    assert parse_fault("kill_at_layer=2") == Fault(kill_at_layer=2)
    fault = parse_fault("kill_at_layer=3, model=poison, max_attempt=1")
    assert fault == Fault(kill_at_layer=3, model="poison", max_attempt=1)
    assert fault.applies("/tmp/poison-model", 1)
    assert not fault.applies("/tmp/poison-model", 2)  # the retry runs untouched
    assert not fault.applies("/tmp/healthy-model", 1)
    assert parse_fault("kill_at_layer=1").applies("anything", 7)
    assert parse_fault("slow_linear=1.5") == Fault(slow_linear=1.5)


@pytest.mark.parametrize("text", ["kill_at_layr=2", "model=poison", "kill_at_layer", "kill_at_layer=two",
                                  "slow_linear=slow"])
def test_a_fault_that_would_inject_nothing_is_refused(text):
    with pytest.raises(ValueError):
        parse_fault(text)
