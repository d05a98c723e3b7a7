"""Seeded calibration data shared by the compression tests.

Inputs are anisotropic like real activations: X = Z diag(logspace) R with Z Gaussian and R a random
rotation, so per-direction energy spans two decades and is not aligned with the input axes.
"""

import pytest
import torch

D_OUT, D_IN, TOKENS = 32, 64, 512


def anisotropic_inputs(tokens: int, d_in: int, seed: int, decades: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, d_in, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    return z @ torch.diag(torch.logspace(0, -decades, d_in)) @ rotation  # (tokens, d_in)


@pytest.fixture
def make_inputs():
    """The generator itself, for tests that need other token counts (fixtures, not imports:
    a conftest module is not importable by name once several test folders have one)."""
    return anisotropic_inputs


@pytest.fixture
def inputs() -> torch.Tensor:
    return anisotropic_inputs(TOKENS, D_IN, seed=1)  # (512, 64)


@pytest.fixture
def gram(inputs: torch.Tensor) -> torch.Tensor:
    return (inputs.T @ inputs / inputs.shape[0]).float()  # (64, 64)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(2))  # (32, 64)
