"""Spec flags -> the same JobSpec the API takes (a --spec file, overridden by flags). Shared by
`squeeze compress` (local run, --out) and `squeeze submit` (remote, --destination)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.jobs.service import looks_local
from app.jobs.spec import JobSpec

# flag -> (section, field, type)
FLAGS: dict[str, tuple[str, str, Any]] = {
    "revision": ("model", "revision", str),
    "quant_method": ("quantization", "method", str),
    "bits": ("quantization", "bits", int),
    "group_size": ("quantization", "group_size", int),
    "symmetric": ("quantization", "symmetric", bool),
    "act_order": ("quantization", "act_order", bool),
    "sparsity_method": ("sparsity", "method", str),
    "sparsity_ratio": ("sparsity", "ratio", float),
    "sparsity_pattern": ("sparsity", "pattern", str),
    "compensation_method": ("compensation", "method", str),
    "rank": ("compensation", "rank", int),
    "adapter_bits": ("compensation", "adapter_bits", int),
    "refine": ("compensation", "refine", int),
    "calibration": ("calibration", "dataset", str),
    "split": ("calibration", "split", str),
    "text_field": ("calibration", "text_field", str),
    "num_samples": ("calibration", "num_samples", int),
    "seq_len": ("calibration", "seq_len", int),
    "seed": ("calibration", "seed", int),
    "eval_dataset": ("evaluation", "dataset", str),
    "eval_windows": ("evaluation", "num_windows", int),
}


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for the compressed model")


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="local model folder or Hub id (overrides the spec's model.id)")
    parser.add_argument("--spec", type=Path, help="a job spec JSON file, as POST /v1/jobs takes")
    for flag, (_, _, kind) in FLAGS.items():
        name = "--" + flag.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(name, type=kind, default=None)
    parser.add_argument("--rank-budget-params", type=int, default=None)
    parser.add_argument("--rank-budget-fraction", type=float, default=None)
    parser.add_argument("--rank-budget-min-rank", type=int, default=None,
                        help="with a rank budget: a rank every Linear gets before the rest is allocated")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Raises pydantic.ValidationError (with field names) on an invalid combination."""
    data = spec_data_from_args(args)
    data.setdefault("destination", {})["uri"] = str(args.out.resolve())
    return JobSpec.model_validate(data)


def spec_data_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --spec file's JSON with the flags applied, not yet validated (a server validates what it is sent)."""
    data: dict[str, Any] = json.loads(args.spec.read_text()) if args.spec else {}
    if args.model:
        data.setdefault("model", {})["id"] = args.model
    for flag, (section, field, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data.setdefault(section, {})
            if data[section] is None:
                data[section] = {}
            data[section][field] = value
    given = {"params": args.rank_budget_params, "fraction": args.rank_budget_fraction,
             "min_rank": args.rank_budget_min_rank}
    budget = {key: value for key, value in given.items() if value is not None}
    if budget:  # the spec refuses min_rank alone, or params with fraction
        data.setdefault("compensation", {})["rank_budget"] = budget
        data["compensation"].pop("rank", None)
    for section in ("model", "calibration", "evaluation"):  # a relative folder of the caller's, not a Hub id
        key = "id" if section == "model" else "dataset"
        ref = (data.get(section) or {}).get(key)
        if isinstance(ref, str) and not looks_local(ref) and Path(ref).exists():
            data[section][key] = str(Path(ref).resolve())
    return data
