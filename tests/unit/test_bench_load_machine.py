"""The load benchmark says how busy the machine was from the kernel's load averages, not from a fixed note."""

from __future__ import annotations

import os

from bench.load import machine_load


def test_machine_note_follows_the_load_at_start():
    cores = os.cpu_count() or 1
    idle, busy = machine_load((0.0, 0.0, 0.0)), machine_load((float(cores), 1.0, 1.0))
    assert idle["busy_at_start"] is False and idle["note"] == "cores idle when the run started"
    assert busy["busy_at_start"] is True and f"1-min load {cores:.2f}" in busy["note"]
    assert len(busy["load_average_at_end"]) == 3 and busy["load_average_at_start"][0] == cores
