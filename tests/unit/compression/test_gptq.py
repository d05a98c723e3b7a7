import pytest
import torch

from tests.unit.compression.quant_spec import spec_of
from worker.compression.gptq import gptq_quantize, inverse_hessian_cholesky
from worker.compression.quantize import dequantize, quantize_rtn


def output_error(x: torch.Tensor, dw: torch.Tensor) -> float:
    """||X dW^T||_F: what the layer's outputs lose on the calibration inputs."""
    return torch.linalg.norm(x.double() @ dw.double().T).item()


def naive_gptq(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, damp: float) -> torch.Tensor:
    """Textbook GPTQ in fp64: one column at a time, H^-1 updated by Gaussian elimination instead
    of a Cholesky factor, no blocks, no lazy updates; a group's grid is set from the (updated)
    weights when its first column comes."""
    maxq = 2**bits - 1
    w = w.double().clone()
    h = gram.double() + damp * gram.double().diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            group = w[:, j : j + group_size]
            xmin, xmax = group.min(1).values.clamp(max=0), group.max(1).values.clamp(min=0)
            scale = ((xmax - xmin) / maxq).float().double()  # the grid the fp32 implementation uses
            zero = torch.round(-xmin / scale)
        q = (torch.clamp(torch.round(w[:, j] / scale) + zero, 0, maxq) - zero) * scale
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= torch.outer(err, hinv[j, j:])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(inputs, gram, weight, bits, act_order):
    spec = spec_of(bits=bits, group_size=16, act_order=act_order, block_size=16)
    gptq = gptq_quantize(weight, gram, spec)
    rtn = quantize_rtn(weight, spec)
    ratio = output_error(inputs, weight - gptq.weight) / output_error(inputs, weight - rtn.weight)
    # Measured 0.45-0.50 on this data, worst 0.56 over 20 other seeds; 0.6 is still a clear margin.
    assert ratio < 0.6


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_on_grid_and_consistent(gram, weight, act_order, symmetric):
    spec = spec_of(bits=3, group_size=16, act_order=act_order, symmetric=symmetric, block_size=8)
    q = gptq_quantize(weight, gram, spec)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
    assert q.scales.shape == (32, 4)
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, q.group_size), q.weight)
    # Groups stay contiguous in the original column order even when visited out of order.
    distinct = max(len(torch.unique(q.weight.reshape(32, 4, 16)[r, g])) for r in range(32) for g in range(4))
    assert distinct <= 8


@pytest.mark.parametrize("group_size,block_size", [(-1, 16), (16, 16), (16, 12), (32, 8)])
def test_matches_naive_fp64_reference(inputs, gram, weight, group_size, block_size):
    # Block sizes that split groups check that a group's grid sees the pending lazy updates.
    spec = spec_of(bits=4, group_size=group_size, block_size=block_size, damp=0.01)
    q = gptq_quantize(weight, gram, spec)
    ref = naive_gptq(weight, gram, bits=4, group_size=q.group_size, damp=0.01)
    # Same codes; values differ only by fp32 vs fp64 rounding of (code - zero) * scale (~1 ulp).
    torch.testing.assert_close(q.weight.double(), ref, rtol=0, atol=1e-6 * weight.abs().max().item())
    assert abs(output_error(inputs, weight - q.weight) / output_error(inputs, weight - ref) - 1) < 1e-5


def test_singular_hessian_retries_damping_and_stays_finite(make_inputs, weight):
    x = make_inputs(16, 64, seed=4)  # 16 tokens for 64 inputs: rank 16
    x[:, :8] = 0  # eight inputs never active: dead columns
    gram = x.T @ x / 16
    spec = spec_of(bits=4, group_size=16, damp=0.0)  # undamped Cholesky of a singular H fails
    q = gptq_quantize(weight, gram, spec)
    assert torch.isfinite(q.weight).all()
    assert torch.all(q.weight[:, :8] == 0)  # dead inputs carry no information: weight dropped
    rtn = quantize_rtn(weight, spec)
    # Measured ratio 0.40 (damping retried from 0 to 1e-4); 0.6 still shows the updates worked.
    assert output_error(x, weight - q.weight) < 0.6 * output_error(x, weight - rtn.weight)


def test_inverse_cholesky_factor(gram):
    upper = inverse_hessian_cholesky(gram.double(), damp=0.01, name="layer")
    damped = gram.double() + 0.01 * gram.double().diagonal().mean() * torch.eye(64, dtype=torch.float64)
    assert torch.equal(upper, upper.triu())
    # fp32 factor of a matrix with condition ~1e4: relative error ~1e-7 * cond.
    identity = (upper.double().T @ upper.double()) @ damped
    torch.testing.assert_close(identity, torch.eye(64, dtype=torch.float64), atol=1e-3, rtol=0)


def test_unfixable_hessian_raises_with_name(weight):
    with pytest.raises(torch.linalg.LinAlgError, match="model.layers.3.mlp.up_proj"):
        gptq_quantize(weight, -torch.eye(64), spec_of(group_size=16), name="model.layers.3.mlp.up_proj")


def test_non_finite_inputs_raise_with_name(gram, weight):
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="q_proj"):
        gptq_quantize(bad, gram, spec_of(group_size=16), name="q_proj")
    bad_gram = gram.clone()
    bad_gram[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="q_proj"):
        gptq_quantize(weight, bad_gram, spec_of(group_size=16), name="q_proj")


@pytest.mark.parametrize("act_order", [False, True])
def test_mask_keeps_exact_zeros(gram, weight, act_order):
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) > 0.5
    pruned = torch.where(mask, weight, torch.zeros_like(weight))
    q = gptq_quantize(pruned, gram, spec_of(bits=4, group_size=16, act_order=act_order), mask=mask)
    assert torch.all(q.weight[~mask] == 0)
    assert torch.equal(q.codes[~mask], q.zeros.repeat_interleave(16, dim=1)[~mask])
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, 16), q.weight)


def test_bf16_weight_keeps_dtype_and_consistency(gram, weight):
    q = gptq_quantize(weight.to(torch.bfloat16), gram, spec_of(bits=4, group_size=16))
    assert q.weight.dtype == torch.bfloat16 and q.scales.dtype == torch.bfloat16
    assert torch.equal(dequantize(q.codes, q.scales.float(), q.zeros, 16).to(torch.bfloat16), q.weight)
