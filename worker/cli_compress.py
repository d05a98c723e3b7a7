"""`squeeze compress`: one compression run in this process, no service. Same pipeline as the worker."""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.compress_args import spec_from_args
from app.settings import Settings
from worker.errors import JobFailure


class ConsoleReporter:
    """Progress bar over decoder layers; events printed as lines."""

    def __init__(self, console: Console):
        self.console = console
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.tasks: dict[str, Any] = {}

    def _bar(self, stage: str, layer: int | None, layers: int | None) -> None:
        if layer is None or layers is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(f"{stage} layers", total=layers)
        self.bars.update(self.tasks[stage], completed=layer)

    def progress(self, stage, percent, layer=None, layers=None, message=None, data=None) -> None:
        self._bar(stage, layer, layers)
        if message and not message.startswith("layer "):
            self.console.log(message)

    def event(self, stage, message, level="info", data=None) -> None:
        self.console.log(f"[{level}] {message}")

    def check_cancelled(self) -> None:
        return None


def metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(title="Squeeze: before / after")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity before", f"{metrics['perplexity_before']:.4f}")
    table.add_row("perplexity after", f"{metrics['perplexity_after']:.4f}")
    table.add_row("ratio", f"{metrics['perplexity_ratio']:.4f}")
    comp = metrics.get("compression", {})
    if comp.get("mean_relative_error_before") is not None:
        table.add_row("mean rel. output error (compressed)", f"{comp['mean_relative_error_before']:.4f}")
    if comp.get("mean_relative_error_after") is not None:
        table.add_row("mean rel. output error (compensated)", f"{comp['mean_relative_error_after']:.4f}")
    if comp.get("max_rank"):
        table.add_row("max adapter rank", str(comp["max_rank"]))
    for name, seconds in metrics.get("timings", {}).items():
        table.add_row(name, f"{seconds:.2f}")
    return table


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        spec = spec_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]invalid {'.'.join(str(p) for p in err['loc']) or 'spec'}:[/red] {err['msg']}")
        return 2
    from worker.pipeline import run_pipeline

    settings = Settings(allow_local_paths=True, artifact_root=args.out.resolve().parent)
    reporter = ConsoleReporter(console)
    try:
        with reporter.bars:
            token = spec.hf_token.get_secret_value() if spec.hf_token else None
            result = run_pipeline(uuid.uuid4(), spec, settings, reporter, token=token)
    except JobFailure as exc:
        console.print(f"[red]failed:[/red] {exc}")
        return 1
    console.print(metrics_table(result.metrics))
    artifacts = {**result.artifacts, "path": str(args.out.resolve())}  # a local run: this machine's own folder
    print(json.dumps({"metrics": result.metrics, "artifacts": artifacts}, indent=2))
    return 0
