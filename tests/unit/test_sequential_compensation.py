"""The sequential pipeline's compensation on tiny models: EoRA and SVD adapters, joint refinement, sink
tokens, quantized adapters, rank budgets and their caps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.outputs import logits, relative_error
from tests.specs import compensation, quant, sparsity
from worker.compression.eora import eora
from worker.compression.gram import accumulate_gram
from worker.compression.ranks import budget_from_fraction, rank_cap
from worker.linear_compress import CompensatedLinear, unwrap_adapters
from worker.models import decoder_linears, get_architecture
from worker.plan import CompressionPlan
from worker.sequential import compress_model

CPU = torch.device("cpu")
GPTQ3 = quant(method="gptq", bits=3, group_size=32)


def test_eora_fixed_rank_reduces_error(tiny_llama, calibration_windows):
    reference = logits(tiny_llama, calibration_windows)
    uncompensated = copy.deepcopy(tiny_llama)
    svd = copy.deepcopy(tiny_llama)
    compress_model(uncompensated, calibration_windows, CompressionPlan(quant=GPTQ3), CPU)
    eora_plan = CompressionPlan(quant=GPTQ3, compensation=compensation(method="eora", rank=8, damp=0.0))
    reports = []
    result = compress_model(tiny_llama, calibration_windows, eora_plan, CPU, on_layer=reports.append)
    svd_plan = CompressionPlan(quant=GPTQ3, compensation=compensation(method="svd", rank=8))
    svd_result = compress_model(svd, calibration_windows, svd_plan, CPU)

    assert [(r.stage, r.index, r.total, r.step, r.steps) for r in reports] == [
        ("compress", 0, 2, 1, 2),
        ("compress", 1, 2, 2, 2),
    ]
    assert set(result.ranks.values()) == {8} and result.max_rank == 8
    wrapped = [m for m in tiny_llama.modules() if isinstance(m, CompensatedLinear)]
    assert len(wrapped) == 14
    expected_params = sum(8 * (d_out + d_in) for d_out, d_in in (m.shape for m in result.modules.values()))
    assert result.adapter_params == expected_params and result.adapter_bytes == 2 * expected_params
    for name, module in result.modules.items():
        assert module.error_after < module.error_before, name
        if name.startswith("model.layers.0."):  # same inputs and weights: EoRA is optimal on them
            assert module.error_after <= svd_result.modules[name].error_after + 1e-6, name
    err_uncompensated = relative_error(logits(uncompensated, calibration_windows), reference)
    err_eora = relative_error(logits(tiny_llama, calibration_windows), reference)
    err_svd = relative_error(logits(svd, calibration_windows), reference)
    assert err_eora < 0.9 * err_uncompensated
    assert err_eora < err_svd


def test_joint_refinement_reports_its_rounds_and_never_loses_on_the_first_layer(tiny_llama, calibration_windows):
    """compensation.refine: each module's error_after is the least of its rounds' errors; on layer 0
    (same inputs as the sequential run) it is at most the sequential run's error_after."""
    two_four = sparsity(method="sparsegpt", n=2, m=4)
    sequential = copy.deepcopy(tiny_llama)
    seq = compress_model(sequential, calibration_windows,
                         CompressionPlan(sparsity=two_four, compensation=compensation(method="eora", rank=8)), CPU)
    plan = CompressionPlan(sparsity=two_four, compensation=compensation(method="eora", rank=8, refine=2))
    result = compress_model(tiny_llama, calibration_windows, plan, CPU)
    improved = 0
    for name, module in result.modules.items():
        assert len(module.refine_errors) == 3 and module.rank == 8, name
        assert module.error_after == pytest.approx(min(module.refine_errors), rel=1e-9), name
        if name.startswith("model.layers.0."):
            assert module.refine_errors[0] == pytest.approx(seq.modules[name].error_after, rel=1e-6), name
            assert module.error_after <= seq.modules[name].error_after * (1 + 1e-6), name
            improved += module.error_after < 0.99 * seq.modules[name].error_after
        kept = (tiny_llama.get_submodule(name).base.weight != 0).reshape(module.shape[0], -1, 4).sum(-1)
        assert (kept <= 2).all(), name
    assert improved == 7  # measured: two rounds lower every layer-0 module's error by 10-29 % on 2:4
    assert all(not m.refine_errors for m in seq.modules.values())


def test_sink_tokens_leave_compression_alone_and_compensate_on_the_rest(tiny_llama, calibration_windows):
    """sink_tokens=1: the same compressed weights; the adapter is EoRA on the Gram of positions >= 1."""
    inputs = []
    hook = tiny_llama.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: inputs.append(args[0].detach()))
    logits(tiny_llama, calibration_windows)
    hook.remove()
    x = torch.cat(inputs)  # (windows, seq, d_in): layer 0's q_proj inputs, as the pipeline sees them
    original = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    models = {}
    for sink in (0, 1):
        models[sink] = copy.deepcopy(tiny_llama)
        spec = compensation(method="eora", rank=8, sink_tokens=sink, damp=0.0)
        compress_model(models[sink], calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)
    q0, q1 = (models[s].model.layers[0].self_attn.q_proj for s in (0, 1))
    assert torch.equal(q0.base.weight, q1.base.weight)
    body_gram, _ = accumulate_gram(x[:, 1:], None, 0)
    full_gram, _ = accumulate_gram(x, None, 0)
    residual = original - q1.base.weight
    for module, gram in ((q1, body_gram), (q0, full_gram)):
        lora_b, lora_a = eora(residual, gram, 8)
        # The module holds the fp16 stored form: each factor is rounded to 11 significant bits.
        stored = module.lora_B.float() @ module.lora_A.float()
        exact = (lora_b @ lora_a).detach()
        torch.testing.assert_close(stored, exact, rtol=0, atol=2e-3 * float(exact.abs().max()))
    delta_0, delta_1 = (q.lora_B.float() @ q.lora_A.float() for q in (q0, q1))
    assert not torch.allclose(delta_0, delta_1, rtol=1e-2, atol=1e-3 * float(delta_0.abs().max()))


def test_sink_tokens_covering_the_window_are_refused(tiny_llama, calibration_windows):
    spec = compensation(rank=4, sink_tokens=calibration_windows.shape[1])
    with pytest.raises(ValueError, match="sink_tokens=32 leaves no calibration token"):
        compress_model(tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)


def test_unwrap_adapters_merged_equals_unmerged(tiny_llama, calibration_windows):
    plan = CompressionPlan(quant=GPTQ3, compensation=compensation(rank=4))
    compress_model(tiny_llama, calibration_windows, plan, CPU)
    compensated = logits(tiny_llama, calibration_windows)
    adapters = unwrap_adapters(tiny_llama)
    assert not any(isinstance(m, CompensatedLinear) for m in tiny_llama.modules())
    assert len(adapters) == 14
    adapter = adapters["model.layers.0.self_attn.q_proj"]
    assert adapter.lora_b.shape == (64, 4) and adapter.lora_a.shape == (4, 64)
    with torch.no_grad():
        for name, adapter in adapters.items():
            linear = tiny_llama.get_submodule(name)
            assert type(linear) is nn.Linear
            linear.weight += adapter.delta()
    torch.testing.assert_close(logits(tiny_llama, calibration_windows), compensated, rtol=1e-4, atol=1e-5)


def test_quantized_adapters(tiny_llama, calibration_windows):
    spec = compensation(rank=8, adapter_bits=4, adapter_group_size=32)
    result = compress_model(tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)
    adapters = unwrap_adapters(tiny_llama)
    adapter = adapters["model.layers.1.mlp.down_proj"]  # A (8, 128): groups of 32 along d_in
    lora_b, lora_a = adapter.lora_b, adapter.lora_a
    assert max(len(torch.unique(group)) for group in lora_a.reshape(-1, 32)) <= 16
    assert len(torch.unique(lora_b[0])) <= 16  # B (64, 8): one group per row
    # down_proj (64, 128), r = 8: 1536 params; groups: B 64 x 1 (groups of 8), A 8 x 4 (groups of 32)
    # -> (1536 + 96) x 4 bits = 816 bytes of codes and zero points + 96 fp16 scales = 1008 bytes.
    assert result.modules["model.layers.1.mlp.down_proj"].adapter_bytes == 1008
    assert result.adapter_bytes < 0.4 * 2 * result.adapter_params


@pytest.mark.parametrize("sink_tokens", [0, 1])
def test_global_budget(tiny_llama, calibration_windows, sink_tokens):
    reports = []
    spec = compensation(method="eora", budget_fraction=0.1, sink_tokens=sink_tokens)
    result = compress_model(
        tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU, on_layer=reports.append
    )
    shapes = {name: m.shape for name, m in result.modules.items()}
    assert result.budget_params == budget_from_fraction(0.1, shapes)
    assert 0.8 * result.budget_params < result.adapter_params <= result.budget_params
    assert len(set(result.ranks.values())) > 2
    assert [(r.stage, r.index, r.step, r.steps) for r in reports] == [
        ("compress", 0, 1, 4),
        ("compress", 1, 2, 4),
        ("compensate", 0, 3, 4),
        ("compensate", 1, 4, 4),
    ]
    assert [len(r.modules) for r in reports] == [7, 7, 7, 7]
    for name, module in result.modules.items():
        wrapped = isinstance(tiny_llama.get_submodule(name), CompensatedLinear)
        assert wrapped == (module.rank > 0), name
        assert module.error_after <= module.error_before, name


def test_budget_in_params_is_spent_and_deterministic(tiny_llama, calibration_windows):
    twin = copy.deepcopy(tiny_llama)
    plan = CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=5000))
    result = compress_model(tiny_llama, calibration_windows, plan, CPU)
    assert result.budget_params == 5000
    largest_unit = max(d_out + d_in for d_out, d_in in (m.shape for m in result.modules.values()))
    assert 5000 - largest_unit < result.adapter_params <= 5000
    assert compress_model(twin, calibration_windows, plan, CPU).ranks == result.ranks


def test_budget_floor_gives_every_module_its_rank_and_spends_the_rest(tiny_llama, calibration_windows):
    spec = compensation(budget_params=5000, min_rank=2)
    result = compress_model(tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)
    floor = sum(2 * sum(m.shape) for m in result.modules.values())
    assert min(result.ranks.values()) == 2
    assert floor < result.adapter_params <= 5000
    largest_unit = max(sum(m.shape) for m in result.modules.values())
    assert 5000 - largest_unit < result.adapter_params


def test_rank_at_the_crossover_is_capped_with_a_note(tiny_llama, calibration_windows, tmp_path):
    """Rank 512 on a 64-wide model: every Linear gets the largest rank still cheaper than its dense
    delta, the adapter is smaller than the dense deltas, A has no all-zero rows, the exported
    adapter_config.json says the true ranks, and the notes say so."""
    import json

    from worker.export.adapter import save_adapter

    dense = sum(w.numel() for w in decoder_linears(tiny_llama, get_architecture(tiny_llama)).values()
                for w in [w.weight])
    plan = CompressionPlan(quant=GPTQ3, compensation=compensation(method="eora", rank=512, damp=1.0))
    result = compress_model(tiny_llama, calibration_windows, plan, CPU)
    for name, module in result.modules.items():
        d_out, d_in = module.shape
        assert module.rank == rank_cap(d_out, d_in) < d_out * d_in / (d_out + d_in), name
        assert module.adapter_params == module.rank * (d_out + d_in) < d_out * d_in, name
    assert result.adapter_params < dense
    assert len(result.notes) == 1 and "compensation.rank 512 is at or above the dense-delta crossover" in result.notes[0]
    assert "64x64: 31" in result.notes[0]
    adapters = unwrap_adapters(tiny_llama)
    for name, adapter in adapters.items():
        lora_b, lora_a = adapter.lora_b, adapter.lora_a
        assert lora_a.shape[0] == result.modules[name].rank
        assert torch.all(lora_a.abs().amax(dim=1) > 0) and torch.all(lora_b.abs().amax(dim=0) > 0), name
    save_adapter(adapters, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    exported = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
    assert exported == result.ranks


def test_budget_beyond_the_caps_and_below_one_unit_say_so(tiny_llama, calibration_windows):
    huge = copy.deepcopy(tiny_llama)
    plan = CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=10**15, damp=1.0))
    result = compress_model(huge, calibration_windows, plan, CPU)
    assert result.ranks == {name: rank_cap(*m.shape) for name, m in result.modules.items()}
    assert len(result.notes) == 1 and "are more than the adapters can use" in result.notes[0]
    plan = CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=1, damp=1.0))
    result = compress_model(tiny_llama, calibration_windows, plan, CPU)
    assert result.max_rank == 0 and result.adapter_params == 0
    assert not any(isinstance(m, CompensatedLinear) for m in tiny_llama.modules())
    assert result.notes == [("compensation.rank_budget: 1 parameters do not pay for one rank of any Linear "
                             "(the cheapest costs 96): no adapter was made")]
    assert all(m.error_after == m.error_before for m in result.modules.values())


def test_the_plans_max_rank_bounds_the_allocator(tiny_llama, calibration_windows):
    from dataclasses import replace

    spec = replace(compensation(budget_params=10**15), max_rank=8)  # as compression_plan(spec, settings.max_rank=8)
    result = compress_model(tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)
    assert set(result.ranks.values()) == {8}
    assert "at most 8" in result.notes[0]


def test_budget_criteria_allocate_differently_and_both_spend_the_budget(tiny_llama, calibration_windows):
    import copy

    ranks = {}
    for criterion in ("absolute", "relative"):
        model = copy.deepcopy(tiny_llama)
        spec = compensation(budget_params=5000, budget_criterion=criterion)
        result = compress_model(model, calibration_windows, CompressionPlan(quant=GPTQ3, compensation=spec), CPU)
        assert 0 < result.adapter_params <= 5000
        ranks[criterion] = result.ranks
    assert ranks["absolute"] != ranks["relative"]


@pytest.mark.parametrize("spec", [compensation(rank=8), compensation(budget_params=5000)], ids=["rank", "budget"])
def test_each_gram_is_decomposed_once_per_walk(spec, tiny_llama, calibration_windows, monkeypatch):
    """q/k/v and gate/up share a Gram and its eigendecomposition: 4 per LLaMA layer, not 7."""
    import worker.sequential as sequential

    calls = []
    decompose = sequential.compensation_eigenspace

    def counted(gram, spec, name):
        calls.append(name)
        return decompose(gram, spec, name)

    monkeypatch.setattr(sequential, "compensation_eigenspace", counted)
    plan = CompressionPlan(quant=GPTQ3, compensation=spec)
    compress_model(tiny_llama, calibration_windows, plan, CPU)
    walks = 2 if plan.uses_budget else 1
    groups = len(get_architecture(tiny_llama).linear_groups)
    assert groups == 4 and len(calls) == walks * len(tiny_llama.model.layers) * groups
    assert len(set(calls)) == len(tiny_llama.model.layers) * groups
