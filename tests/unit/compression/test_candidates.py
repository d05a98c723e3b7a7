"""The size target's error curves (worker.candidates): each option's error is the calibration-weighted
output error of what the job would store, computed here the slow way from the inputs X themselves;
its bytes are the export's formulas."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.specs import compensation
from tests.unit.compression.quant_spec import spec_of
from worker.candidates import leading_factors, measure_options
from worker.compression.allocate import Candidate, allocate
from worker.compression.quantize import quantize_rtn
from worker.compression.ranks import rank_cap
from worker.export.sizes import pack_quantized_bytes
from worker.linear_compress import adapter_size, compensation_decomposition, compensation_factors

QUANTS = [spec_of(method="rtn", bits=bits, group_size=group) for bits in (2, 3, 4, 8) for group in (16, 64, -1)]
EXACT_EORA = compensation(method="eora", rank=8, damp=0.0, adapter_group_size=16)
RANKS = (0, 4, 8, 16, 48)  # 48 is above rank_cap(32, 64) = 21


def slow_error(residual: torch.Tensor, inputs: torch.Tensor) -> float:
    """||R X^T||_F^2 / N in fp64, from the inputs (tokens, d_in)."""
    return float((residual.double() @ inputs.double().T).square().sum() / inputs.shape[0])


def test_each_options_error_is_its_stored_forms_output_error(weight, gram, inputs):
    options = measure_options(weight, gram, QUANTS, None, EXACT_EORA, RANKS, (None, 4), "m")
    assert rank_cap(*weight.shape) == 21
    expected_keys = {(q, r, b) for q in QUANTS for r in (4, 8, 16) for b in (None, 4)} | {(q, 0, None) for q in QUANTS}
    assert {(o.quant, o.rank, o.adapter_bits) for o in options} == expected_keys
    for option in options:
        residual = weight - quantize_rtn(weight, option.quant).weight  # (d_out, d_in)
        if option.rank:
            spec = replace(EXACT_EORA, adapter_bits=option.adapter_bits)
            residual = residual - compensation_factors(residual, gram, spec, option.rank, "m").delta()
        # gram is fp32 (S = X^T X / N rounded once); the slow path uses X itself.
        assert option.error == pytest.approx(slow_error(residual, inputs), rel=1e-5), option


def test_errors_fall_with_bits_and_rank(weight, gram):
    options = measure_options(weight, gram, QUANTS, None, EXACT_EORA, RANKS, (None,), "m")
    error = {(o.quant.bits, o.quant.group_size, o.rank): o.error for o in options}
    for group in (16, 64, -1):
        assert error[(2, group, 0)] > error[(3, group, 0)] > error[(4, group, 0)] > error[(8, group, 0)]
        for bits in (2, 3, 4, 8):
            curve = [error[(bits, group, rank)] for rank in (0, 4, 8, 16)]
            assert curve == sorted(curve, reverse=True) and curve[-1] < 0.8 * curve[0], (bits, group, curve)


def test_bytes_are_the_export_formulas(weight, gram):
    stored = measure_options(weight, gram, QUANTS, None, EXACT_EORA, RANKS, (None, 4), "m")
    served = measure_options(weight, gram, QUANTS, None, EXACT_EORA, RANKS, (None, 4), "m", served_adapters=True)
    d_out, d_in = weight.shape
    for kept, engine in zip(stored, served, strict=True):
        q = kept.quant
        base = sum(pack_quantized_bytes(d_out, d_in, q.bits, q.group_size, q.symmetric, scale_bytes=4).values())
        params, adapter = adapter_size(d_out, d_in, kept.rank, replace(EXACT_EORA, adapter_bits=kept.adapter_bits))
        assert kept.bytes == base + adapter and engine.bytes == base + 2 * params
        assert engine.error == kept.error
    four_bit = [o for o in stored if o.rank == 8 and o.adapter_bits == 4 and o.quant == QUANTS[0]][0]
    fp16 = [o for o in stored if o.rank == 8 and o.adapter_bits is None and o.quant == QUANTS[0]][0]
    assert four_bit.bytes < fp16.bytes


def test_without_compensation_there_is_one_option_per_quantizer(weight, gram):
    options = measure_options(weight, gram, QUANTS, None, None, RANKS, (None,), "m")
    assert [(o.quant, o.rank) for o in options] == [(q, 0) for q in QUANTS]


def test_adapters_are_fitted_on_the_compensation_gram_and_judged_on_every_token(weight, gram, inputs):
    """As the run does with sink tokens: the adapter comes from the Gram without them, its error is over all."""
    body = inputs[64:]  # (448, d_in): the tokens the compensation sees
    body_gram = (body.T @ body / body.shape[0]).float()
    quants = QUANTS[:2]
    options = measure_options(weight, gram, quants, None, EXACT_EORA, (8,), (None,), "m", compensate_gram=body_gram)
    for option in options:
        residual = weight - quantize_rtn(weight, option.quant).weight
        adapter = compensation_factors(residual, body_gram, EXACT_EORA, 8, "m")
        assert option.error == pytest.approx(slow_error(residual - adapter.delta(), inputs), rel=1e-5)
        fitted_on_all = compensation_factors(residual, gram, EXACT_EORA, 8, "m")
        assert option.error > slow_error(residual - fitted_on_all.delta(), inputs)  # EoRA on all tokens is optimal there


def test_the_allocator_takes_4_bit_adapters_where_they_hold_more_for_the_bytes(weight, gram):
    """One Linear's measured options with fp16 and 4-bit adapters: within the bytes of the fp16 rank-4 option
    the allocation takes a 4-bit adapter of a higher rank, with less error than any fp16 choice that fits."""
    options = measure_options(weight, gram, QUANTS[:1], None, EXACT_EORA, (0, 4, 8, 16), (None, 4), "m")
    budget = next(o for o in options if o.rank == 4 and o.adapter_bits is None).bytes
    allocation = allocate({"m": [Candidate(o.bytes, o.error) for o in options]}, {"m": 1.0}, budget)
    picked = options[allocation.choice["m"]]
    assert picked.adapter_bits == 4 and picked.rank > 4 and allocation.exact
    assert picked.error < min(o.error for o in options if o.adapter_bits is None and o.bytes <= budget)


def test_at_equal_error_the_allocator_takes_the_cheaper_adapter():
    """Synthetic: per module an fp16 and a 4-bit adapter of the same error (and no adapter); with room for
    every fp16 one, the plan still stores the 4-bit ones."""
    candidates = {f"m{i}": [Candidate(bytes=100, error=9.0), Candidate(bytes=100 + 2 * 96 * 8, error=1.0 + i),
                            Candidate(bytes=100 + 544, error=1.0 + i)] for i in range(3)}
    allocation = allocate(candidates, dict.fromkeys(candidates, 1.0), budget=3 * (100 + 2 * 96 * 8))
    assert allocation.choice == dict.fromkeys(candidates, 2) and allocation.bytes == 3 * (100 + 544)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])  # P P^T and P^T P: both sides of the route
@pytest.mark.parametrize("spec", [EXACT_EORA, replace(EXACT_EORA, damp=0.1), compensation(method="svd", rank=8)],
                         ids=["eora", "eora-damped", "svd"])
def test_leading_factors_are_the_runs_decomposition_cut_at_each_rank(shape, spec, make_inputs):
    """The curves' factors (from the smaller Gram of the projected error) are the run's (its SVD), in the
    same orientation, to rounding: a quantized adapter of either is then the same codes."""
    d_out, d_in = shape
    inputs = make_inputs(512, d_in, seed=3)
    gram = (inputs.T @ inputs / inputs.shape[0]).float()
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(4))
    residual = weight - quantize_rtn(weight, QUANTS[3]).weight
    b, a = leading_factors(residual, gram, spec, 16, "m")
    run = compensation_decomposition(residual, gram, spec, "m")
    for r in (1, 4, 16):
        rb, ra = run.lowrank(r)
        assert torch.allclose(b[:, :r], rb, rtol=1e-4, atol=1e-6) and torch.allclose(a[:r], ra, rtol=1e-4, atol=1e-6)
        assert (rb.gather(0, rb.abs().argmax(dim=0, keepdim=True)) > 0).all()  # canonical: each B column's largest entry > 0


def test_leading_factors_stop_at_the_residuals_real_directions(make_inputs):
    """A rank-3 residual gives three directions whatever rank is asked for, as the run's decomposition does."""
    inputs = make_inputs(512, 64, seed=5)
    gram = (inputs.T @ inputs / inputs.shape[0]).float()
    gen = torch.Generator().manual_seed(6)
    residual = torch.randn(32, 3, generator=gen) @ torch.randn(3, 64, generator=gen)
    for spec in (EXACT_EORA, replace(EXACT_EORA, damp=0.1)):
        b, a = leading_factors(residual, gram, spec, 16, "m")
        assert b.shape == (32, 3) and a.shape == (3, 64)
        assert compensation_decomposition(residual, gram, spec, "m").s.shape[0] == 3
        assert torch.allclose(b @ a, residual, atol=1e-4)


def test_a_weight_its_quantizer_stores_exactly_has_no_adapter_options(gram):
    """Every entry on the 4-bit grid of one group per row: no error, so nothing for an adapter to fit."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (32, 64), generator=gen).float()
    codes[:, 0], codes[:, 1] = 0.0, 15.0  # each row spans the grid: its scale and zero point are exact
    weight = (codes - 8.0) * 0.25  # (32, 64)
    quant = spec_of(method="rtn", bits=4, group_size=-1)
    options = measure_options(weight, gram, [quant], None, EXACT_EORA, (0, 4, 8), (None, 4), "m")
    assert [(o.rank, o.error) for o in options] == [(0, 0.0)]
