import pytest
import torch

from tests.unit.compression.quant_spec import spec_of
from worker.compression.quantize import dequantize, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_on_grid_and_consistent(weight, bits, symmetric):
    q = quantize_rtn(weight, spec_of(method="rtn", bits=bits, group_size=16, symmetric=symmetric))
    assert q.codes.dtype == torch.uint8 and q.zeros.dtype == torch.uint8
    assert q.codes.shape == (32, 64) and q.scales.shape == (32, 4) and q.zeros.shape == (32, 4)
    assert int(q.codes.max()) <= 2**bits - 1
    groups = q.weight.reshape(32, 4, 16)
    distinct = max(len(torch.unique(groups[r, g])) for r in range(32) for g in range(4))
    assert distinct <= 2**bits
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, q.group_size), q.weight)
    if symmetric:
        assert torch.all(q.zeros == 2 ** (bits - 1))


def test_error_within_half_step_and_shrinks_with_bits(weight):
    errors = {}
    for bits in (4, 8):
        q = quantize_rtn(weight, spec_of(method="rtn", bits=bits, group_size=16))
        step = q.scales.repeat_interleave(16, dim=1)  # (32, 64)
        # Asymmetric ranges cover [min, max] of each group, so nothing clips: |err| <= step / 2
        # (x 1.0001 for the fp32 rounding of w / scale).
        assert torch.all((weight - q.weight).abs() <= step / 2 * 1.0001)
        errors[bits] = torch.linalg.norm(weight - q.weight).item()
    # 16x finer steps in theory; 1/8 leaves room for the random draw.
    assert errors[8] < errors[4] / 8


def test_per_channel_is_one_group_per_row(weight):
    q = quantize_rtn(weight, spec_of(method="rtn", bits=4, group_size=-1))
    assert q.group_size == 64 and q.scales.shape == (32, 1)
    per_row = quantize_rtn(weight, spec_of(method="rtn", bits=4, group_size=64))
    assert torch.equal(q.codes, per_row.codes)


def test_bad_group_size_and_bits_are_rejected(weight):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide d_in=64"):
        quantize_rtn(weight, spec_of(method="rtn", bits=4, group_size=48))
    with pytest.raises(ValueError, match="bits=5"):
        quantize_rtn(weight, spec_of(method="rtn", bits=5, group_size=16))


def test_mask_dequantizes_to_exact_zeros(weight):
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    q = quantize_rtn(weight, spec_of(method="rtn", bits=3, group_size=16), mask=mask)
    zero_points = q.zeros.repeat_interleave(16, dim=1)
    assert torch.all(q.weight[~mask] == 0)
    assert torch.equal(q.codes[~mask], zero_points[~mask])


def test_all_zero_rows_stay_zero_and_finite():
    w = torch.zeros(4, 16)
    w[1] = torch.linspace(-1, 1, 16)
    q = quantize_rtn(w, spec_of(method="rtn", bits=4, group_size=8))
    assert torch.isfinite(q.scales).all()
    assert torch.all(q.weight[[0, 2, 3]] == 0)


def test_bf16_scales_rederive_the_same_codes(weight):
    w = weight.to(torch.bfloat16)
    q = quantize_rtn(w, spec_of(method="rtn", bits=4, group_size=16))
    assert q.weight.dtype == torch.bfloat16 and q.scales.dtype == torch.bfloat16
    # What an exporter does with bf16 weight and scale: codes = round(w / s) + z must round-trip.
    scales = q.scales.float().repeat_interleave(16, dim=1)
    zeros = q.zeros.float().repeat_interleave(16, dim=1)
    rederived = torch.round(q.weight.float() / scales) + zeros
    assert torch.equal(rederived, q.codes.float())
