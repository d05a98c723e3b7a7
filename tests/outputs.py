"""What the tests read from a model's outputs: its logits on some windows, and how far apart two are."""

from __future__ import annotations

import torch


def logits(model, windows: torch.Tensor) -> torch.Tensor:
    """model(input_ids=windows).logits without gradients."""
    with torch.no_grad():
        return model(input_ids=windows).logits


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| (Frobenius)."""
    return float((output - reference).norm() / reference.norm())
