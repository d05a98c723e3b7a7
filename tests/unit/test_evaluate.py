"""Layer-by-layer perplexity equals the full model's, with and without compensated Linears."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures_models import build_tiny_model
from tests.specs import compensation, quant
from worker.evaluate import perplexity
from worker.linear_compress import CompensatedLinear
from worker.plan import CompressionPlan
from worker.sequential import compress_model

CPU = torch.device("cpu")


def full_model_perplexity(model, windows) -> float:
    """Reference: one forward of the whole model, mean NLL of tokens 1..L-1 of every window."""
    with torch.no_grad():
        logits = model(windows).logits.double()  # (n, L, vocab)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gemma2", "gemma3"])
def test_perplexity_matches_full_forward(family, tiny_tokenizer, calibration_windows):
    model = build_tiny_model(family, len(tiny_tokenizer))
    expected = full_model_perplexity(model, calibration_windows)
    assert perplexity(model, calibration_windows, CPU, batch_size=3) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, calibration_windows, CPU, batch_size=8) == pytest.approx(expected, rel=1e-4)
    # A random model over a ~320-token vocabulary is close to uniform.
    assert 100 < expected < 1000


def test_perplexity_with_compensated_linears(tiny_llama, calibration_windows):
    before = perplexity(tiny_llama, calibration_windows, CPU)
    plan = CompressionPlan(quant=quant(method="rtn", bits=2, group_size=32), compensation=compensation(rank=4))
    compress_model(tiny_llama, calibration_windows, plan, CPU)
    assert any(isinstance(m, CompensatedLinear) for m in tiny_llama.modules())
    after = perplexity(tiny_llama, calibration_windows, CPU, batch_size=5)
    assert after == pytest.approx(full_model_perplexity(tiny_llama, calibration_windows), rel=1e-4)
    assert abs(after - before) / before > 1e-3
