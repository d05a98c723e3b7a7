from dataclasses import replace

import pytest
import torch

from tests.unit.compression.quant_spec import spec_of
from worker.compression.gptq import gptq_quantize
from worker.compression.prune import (
    magnitude_scores,
    mask_from_scores,
    prune,
    wanda_scores,
)
from worker.compression.quantize import dequantize, quantize_rtn
from worker.compression.sparsegpt import sparsegpt_prune
from worker.compression.specs import QuantSpec, SparsitySpec


def output_error(x: torch.Tensor, dw: torch.Tensor) -> float:
    return torch.linalg.norm(x.double() @ dw.double().T).item()


def naive_sparsegpt(w, gram, spec: SparsitySpec, quant: QuantSpec | None = None):
    """SparseGPT in fp64 one column at a time, H^-1 updated by Gaussian elimination (no Cholesky,
    no lazy blocks). The OBS pivot of column j is [H^-1]_jj once columns < j are eliminated; it
    does not depend on the weights, so it is computed up front for the saliency w^2 / pivot."""
    d = w.shape[1]
    w = w.double().clone()
    h = gram.double() + spec.damp * gram.double().diagonal().mean() * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    pivots, t = torch.empty(d, dtype=torch.float64), hinv.clone()
    for j in range(d):
        pivots[j] = t[j, j]
        t = t - torch.outer(t[:, j], t[j, :]) / t[j, j]
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(d):
        if spec.is_nm and j % spec.m == 0:
            saliency = w[:, j : j + spec.m] ** 2 / pivots[j : j + spec.m]
            top = torch.topk(saliency, spec.n, dim=1).indices
            keep[:, j : j + spec.m] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, top, True)
        elif not spec.is_nm and j % spec.block_size == 0:
            saliency = w[:, j : j + spec.block_size] ** 2 / pivots[j : j + spec.block_size]
            lowest = torch.argsort(saliency.flatten(), stable=True)[: int(saliency.numel() * spec.ratio)]
            flat = torch.ones(saliency.numel(), dtype=torch.bool)
            flat[lowest] = False
            keep[:, j : j + spec.block_size] = flat.view_as(saliency)
        q = torch.where(keep[:, j], w[:, j], 0.0)
        if quant is not None:
            if j % quant.group_size == 0:
                group = torch.where(keep[:, j : j + quant.group_size], w[:, j : j + quant.group_size], 0.0)
                maxq = 2**quant.bits - 1
                xmin, xmax = group.min(1).values.clamp(max=0), group.max(1).values.clamp(min=0)
                scale = ((xmax - xmin) / maxq).float().double()  # the fp32 grid of the implementation
                zero = torch.round(-xmin / scale)
            q = (torch.clamp(torch.round(q / scale) + zero, 0, maxq) - zero) * scale
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= torch.outer(err, hinv[j, j:])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w, keep


@pytest.mark.parametrize(
    "spec",
    [SparsitySpec(method="sparsegpt", n=2, m=4, block_size=16),
     SparsitySpec(method="sparsegpt", ratio=0.5, block_size=16)],
    ids=["2:4", "50%"],
)
@pytest.mark.parametrize("quant", [None, spec_of(bits=4, group_size=16)], ids=["prune", "prune+q4"])
def test_sparsegpt_matches_naive_fp64_reference(gram, weight, spec, quant):
    w_new, keep, _ = sparsegpt_prune(weight, gram, spec, quant)
    ref, ref_keep = naive_sparsegpt(weight, gram, spec, quant)
    assert torch.equal(keep, ref_keep)
    # fp32 sweep vs fp64 elimination: measured max difference 2e-7 of the weight scale.
    torch.testing.assert_close(w_new.double(), ref, rtol=0, atol=1e-5 * weight.abs().max().item())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_exactly_n_per_run(gram, weight, method, n, m):
    w_pruned, keep = prune(weight, gram, SparsitySpec(method=method, n=n, m=m, block_size=16))
    assert torch.all(keep.reshape(32, 64 // m, m).sum(-1) == n)
    assert torch.all(w_pruned[~keep] == 0)
    if method != "sparsegpt":  # only SparseGPT updates the kept weights
        assert torch.equal(w_pruned[keep], weight[keep])


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_prunes_exact_count_per_row(gram, weight, method):
    _, keep = prune(weight, gram, SparsitySpec(method=method, ratio=0.3))
    assert torch.all((~keep).sum(1) == int(64 * 0.3))  # 19 of 64 in every row


def test_magnitude_prunes_the_smallest(weight):
    keep = mask_from_scores(magnitude_scores(weight), SparsitySpec(method="magnitude", ratio=0.5))
    kept_min = torch.where(keep, weight.abs(), torch.inf).min(1).values
    pruned_max = torch.where(keep, -torch.inf, weight.abs()).max(1).values
    assert torch.all(kept_min >= pruned_max)


def test_wanda_uses_input_norms(weight):
    # Input columns with norms over two decades and no rotation: |W| alone is the wrong saliency.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(512, 64, generator=gen) * torch.logspace(0, -2, 64)[torch.randperm(64, generator=gen)]
    gram = x.T @ x / 512
    spec = SparsitySpec(method="wanda", ratio=0.5)
    keep_wanda = mask_from_scores(wanda_scores(weight, gram), spec)
    keep_mag = mask_from_scores(magnitude_scores(weight), spec)
    assert (keep_wanda != keep_mag).float().mean() > 0.1  # measured 0.35
    err_wanda = output_error(x, torch.where(keep_wanda, 0.0, weight))
    err_mag = output_error(x, torch.where(keep_mag, 0.0, weight))
    assert err_wanda < 0.5 * err_mag  # measured 0.19


@pytest.mark.parametrize(
    "spec",
    [
        SparsitySpec(method="sparsegpt", ratio=0.5, block_size=16),
        SparsitySpec(method="sparsegpt", n=2, m=4, block_size=16),
    ],
    ids=["50%", "2:4"],
)
def test_sparsegpt_beats_magnitude(inputs, gram, weight, spec):
    w_sparse, keep = prune(weight, gram, spec)
    magnitude = SparsitySpec(method="magnitude", ratio=spec.ratio, n=spec.n, m=spec.m)
    w_mag, _ = prune(weight, gram, magnitude)
    assert keep.float().mean().item() == 0.5
    ratio = output_error(inputs, weight - w_sparse) / output_error(inputs, weight - w_mag)
    assert ratio < 0.7  # measured 0.49 (50%) and 0.53 (2:4); worst over 20 other seeds 0.65


def test_sparsegpt_unstructured_count_per_block(gram, weight):
    _, keep = prune(weight, gram, SparsitySpec(method="sparsegpt", ratio=0.3, block_size=24))
    # Blocks of 24, 24, 16 columns: int(0.3 * 32 * cols) weights pruned in each.
    assert [(~keep[:, c : c + w]).sum().item() for c, w in ((0, 24), (24, 24), (48, 16))] == [230, 230, 153]


@pytest.mark.parametrize(
    "spec",
    [SparsitySpec(method="sparsegpt", ratio=0.5, block_size=16),
     SparsitySpec(method="sparsegpt", n=2, m=4, block_size=16)],
    ids=["50%", "2:4"],
)
def test_joint_sparsegpt_quant_keeps_exact_zeros_on_grid(inputs, gram, weight, spec):
    quant = spec_of(bits=4, group_size=16)
    w_new, keep, q = sparsegpt_prune(weight, gram, spec, quant)
    assert torch.equal(w_new, q.weight)
    assert torch.all(q.weight[~keep] == 0)
    assert torch.equal(q.codes[~keep], q.zeros.repeat_interleave(16, dim=1)[~keep])
    assert int(q.codes.max()) <= 15
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, 16), q.weight)
    # Against the sequential baseline magnitude -> RTN the joint pass is far better;
    # measured 0.54 (50%) and 0.55 (2:4), worst over 20 other seeds 0.65.
    magnitude = SparsitySpec(method="magnitude", ratio=spec.ratio, n=spec.n, m=spec.m)
    w_mag, keep_mag = prune(weight, gram, magnitude)
    baseline = quantize_rtn(w_mag, quant, mask=keep_mag).weight
    assert output_error(inputs, weight - w_new) < 0.7 * output_error(inputs, weight - baseline)


def test_joint_sparsegpt_gptq_takes_the_quantizers_damp(gram, weight):
    """SparseGPT + GPTQ is one sweep on one Hessian: quantization.damp (the job's knob) damps it, and
    SparsitySpec.damp (SparseGPT alone) does not."""
    spec = SparsitySpec(method="sparsegpt", n=2, m=4, block_size=16)
    low, _, _ = sparsegpt_prune(weight, gram, spec, spec_of(damp=0.01))
    high, _, _ = sparsegpt_prune(weight, gram, spec, spec_of(damp=0.9))
    assert (low != high).float().mean() > 0.05  # measured: most weights move
    other, _, _ = sparsegpt_prune(weight, gram, replace(spec, damp=0.5), spec_of(damp=0.01))
    assert torch.equal(other, low)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_then_gptq_with_mask_keeps_exact_zeros(inputs, gram, weight, method):
    w_pruned, keep = prune(weight, gram, SparsitySpec(method=method, n=2, m=4))
    quant = spec_of(bits=4, group_size=16)
    q = gptq_quantize(w_pruned, gram, quant, mask=keep)
    assert torch.all(q.weight[~keep] == 0)
    # GPTQ still beats RTN on the quantization error of the pruned weight, by less than unpruned
    # (only kept weights can absorb error); measured 0.82 / 0.83, worst over 20 other seeds 0.86.
    rtn = quantize_rtn(w_pruned, quant, mask=keep)
    assert output_error(inputs, w_pruned - q.weight) < 0.95 * output_error(inputs, w_pruned - rtn.weight)


def test_invalid_specs_raise(gram, weight):
    with pytest.raises(ValueError, match="d_in divisible by m"):
        prune(weight[:, :62], gram[:62, :62], SparsitySpec(method="magnitude", n=2, m=4))
    with pytest.raises(ValueError, match="0 < n < m"):
        prune(weight, gram, SparsitySpec(method="wanda", n=4, m=4))
    with pytest.raises(ValueError, match="ratio"):
        prune(weight, gram, SparsitySpec(method="sparsegpt"))
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=method):
            prune(weight, None, SparsitySpec(method=method, ratio=0.5))


def test_sparsegpt_non_finite_raises_with_name(gram, weight):
    bad = gram.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="layers.0.self_attn.o_proj"):
        sparsegpt_prune(weight, bad, SparsitySpec(method="sparsegpt", n=2, m=4), name="layers.0.self_attn.o_proj")
