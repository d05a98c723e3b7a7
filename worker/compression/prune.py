"""One-shot pruning masks: magnitude, Wanda (Sun et al. 2023, arXiv 2306.11695), and dispatch to SparseGPT.

Masks are bool tensors shaped like the weight, True = keep. Unstructured sparsity prunes the same
count in every output row (Wanda's per-output comparison group); N:M keeps the n highest scores in
every run of m consecutive input columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.compression.specs import SparsitySpec


def nm_pattern(spec: SparsitySpec) -> tuple[int, int]:
    """(n, m) of an N:M spec."""
    if spec.n is None or spec.m is None:
        raise ValueError(f"N:M sparsity needs both n and m, got n={spec.n}, m={spec.m}")
    return spec.n, spec.m


def unstructured_ratio(spec: SparsitySpec) -> float:
    """The ratio of an unstructured spec."""
    if spec.ratio is None:
        raise ValueError("unstructured sparsity needs a ratio")
    return spec.ratio


def check_sparsity(spec: SparsitySpec, d_in: int) -> None:
    """Reject specs that are neither exactly unstructured nor exactly N:M for this d_in."""
    if spec.is_nm:
        if spec.ratio is not None or spec.m is None:
            raise ValueError("N:M sparsity needs both n and m and no ratio")
        n, m = nm_pattern(spec)
        if not 0 < n < m:
            raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
        if d_in % m != 0:
            raise ValueError(f"N:M sparsity with m={m} needs d_in divisible by m, got d_in={d_in}")
    elif spec.ratio is None or not 0.0 <= spec.ratio < 1.0:
        raise ValueError(f"unstructured sparsity needs 0 <= ratio < 1, got ratio={spec.ratio}")


def pruned_per_row(spec: SparsitySpec, d_in: int) -> int:
    """Weights zeroed in each row for unstructured sparsity (floor, as the reference codes)."""
    return int(d_in * unstructured_ratio(spec))


def magnitude_scores(w: Tensor) -> Tensor:
    """|W| (d_out, d_in) fp32."""
    return w.float().abs()


def wanda_scores(w: Tensor, gram: Tensor) -> Tensor:
    """|W_ij| * ||X_j||: weight magnitude times the RMS of its input (d_out, d_in) fp32.

    diag(gram) = E[x_j^2], so sqrt(diag) is Wanda's input-column norm up to a constant factor.
    """
    norms = torch.diagonal(gram).float().clamp(min=0.0).sqrt()  # (d_in,)
    return w.float().abs() * norms.unsqueeze(0)


def mask_from_scores(scores: Tensor, spec: SparsitySpec) -> Tensor:
    """Keep mask (d_out, d_in) bool from scores (d_out, d_in); ties broken by column index."""
    d_out, d_in = scores.shape
    check_sparsity(spec, d_in)
    if spec.is_nm:
        n, m = nm_pattern(spec)
        runs = scores.reshape(d_out, d_in // m, m)  # (d_out, d_in/m, m)
        top = torch.topk(runs, n, dim=-1).indices
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(d_out, d_in)
    k = pruned_per_row(spec, d_in)
    lowest = torch.argsort(scores, dim=1, stable=True)[:, :k]  # (d_out, k)
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, lowest, False)


def prune(w: Tensor, gram: Tensor | None, spec: SparsitySpec, name: str = "") -> tuple[Tensor, Tensor]:
    """Prune w (d_out, d_in) by spec.method: (w_pruned in w's dtype, keep mask bool).

    magnitude ignores gram (may be None); wanda and sparsegpt need it. sparsegpt also updates the
    kept weights to compensate (OBS); the other two only zero the pruned ones.
    """
    if spec.method == "magnitude":
        scores = magnitude_scores(w)
    elif spec.method in ("wanda", "sparsegpt"):
        if gram is None:
            raise ValueError(f"{name}: {spec.method} pruning needs calibration statistics (gram)")
        if spec.method == "sparsegpt":
            # Imported here: sparsegpt builds on this module's spec checks, so it cannot be imported above.
            from worker.compression.sparsegpt import sparsegpt_prune

            w_new, keep, _ = sparsegpt_prune(w, gram, spec, None, name)
            return w_new, keep
        scores = wanda_scores(w, gram)
    else:
        raise ValueError(f"unknown sparsity method {spec.method!r}")
    keep = mask_from_scores(scores, spec)
    return torch.where(keep, w, torch.zeros_like(w)), keep
