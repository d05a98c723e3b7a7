"""A layer callback that stops a compression run after a given step, standing in for a lost worker."""

from __future__ import annotations


class Stop(Exception):
    pass


def stop_after(steps: int):
    def on_layer(report):
        if report.step == steps:
            raise Stop(f"worker lost after step {steps}")
    return on_layer
