"""Size targets on a tiny LLaMA: the plan the allocator chooses compresses, exports and verifies, and
its stored bits per weight, summed from the files' tensors, are the allocation's bytes exactly and
within the target; vLLM targets keep fused sets on one scheme; an impossible target fails before any
work with the smallest size in the message."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from tests.specs import compensation, quant
from tests.unit.test_export import VERIFY_WINDOWS, extra, logits_of
from tests.unit.test_export_adapter import card_recipe
from worker import target as target_module
from worker.export import export_model, reference_logits, verify_export
from worker.export.sizes import module_bytes, pack_quantized_bytes
from worker.export.verify import load_export
from worker.linear_compress import adapter_size
from worker.models import get_architecture, load_model
from worker.plan import CompressionPlan
from worker.sequential import compress_model
from worker.summaries import planning_summary
from worker.target import SizeTarget, TargetError, output_sensitivity, plan_for_target

CPU = torch.device("cpu")
BASE = CompressionPlan(quant=quant(method="rtn"), compensation=compensation(method="eora", rank=8))
ANY = SizeTarget(bits_per_weight=4.5, engine="transformers", bits=(2, 3, 4, 8), group_sizes=(16, 32, 64, -1),
                 ranks=(0, 4, 8), measure_with="rtn")
# Only 2 and 3 bits: what the budget has beyond 3 bits goes to adapters, ranks differing by module.
LOW_BITS = SizeTarget(bits_per_weight=4.0, engine="transformers", bits=(2, 3), group_sizes=(16, 32, 64, -1),
                      ranks=(0, 4, 8), measure_with="rtn")
VLLM = SizeTarget(bits_per_weight=6.0, engine="vllm", bits=(4, 8), group_sizes=(32, 64, -1), ranks=(0, 8, 16),
                  measure_with="rtn")


# 2-3 bit weights and ranks up to 8 (the tiny model's Linears take no more): what the budget has beyond 4-bit
# rank-8 adapters everywhere buys fp16 ones where they remove the most error (on the tiny model, 4 of 14).
MIXED_ADAPTERS = SizeTarget(bits_per_weight=7.0, engine="transformers", bits=(2, 3), group_sizes=(16, 32, 64, -1),
                            ranks=(0, 4, 8), adapter_bits=(None, 4), measure_with="rtn")


def run_target(model_dir, windows, base, target, out):
    """(the plan, the run's result, the export, the compressed model's logits on the verification windows)."""
    model, tokenizer = load_model(model_dir)
    chosen = plan_for_target(model, windows, base, target, CPU)
    result = compress_model(model, windows, chosen.plan, CPU)
    reference = reference_logits(model, windows[:VERIFY_WINDOWS])
    info = export_model(model, tokenizer, result, chosen.plan, out, extra(windows))
    assert verify_export(out, reference, windows[:VERIFY_WINDOWS]).max_abs_diff <= 1e-4
    return chosen, result, info, reference


def stored_bytes(info, result) -> int:
    """Linear tensors' bytes in the checkpoint plus the adapter file's tensors."""
    linear = sum(sum(parts.values()) for parts in module_bytes(info.out_dir, result.modules).values())
    return linear + (0 if info.adapter is None else info.adapter.stored_bytes)


@pytest.mark.parametrize("target", [ANY, LOW_BITS], ids=["2-8 bits", "2-3 bits + adapters"])
def test_a_target_is_met_exactly_as_counted_from_the_files(target, tiny_model_dir, calibration_windows, tmp_path):
    chosen, result, info, _ = run_target(tiny_model_dir, calibration_windows, BASE, target, tmp_path / "out")
    assert stored_bytes(info, result) == chosen.allocation.bytes <= chosen.budget
    assert info.sizes["bits_per_weight_stored"] == pytest.approx(chosen.bits_per_weight) and \
        chosen.bits_per_weight <= target.bits_per_weight
    assert chosen.budget - chosen.allocation.bytes < 8 * 64  # the budget is spent: at most a small step is left
    assert chosen.allocation.exact
    schemes = {(m.quantized.bits, m.quantized.group_size) for m in result.modules.values()}
    assert len(schemes) > 1 and info.checkpoint.mixed  # the target made a mixed-precision plan
    ranks = {m.rank for m in result.modules.values()}
    assert ranks <= set(target.ranks)
    if target is LOW_BITS:
        assert len(ranks) > 1 and info.adapter is not None  # adapters where they pay, of differing ranks
    manifest = info.manifest["modules"]
    for name, option in chosen.chosen.items():
        entry = manifest[name]
        assert (entry["bits"], entry["rank"]) == (option.quant.bits, option.rank), name
    again = plan_for_target(load_model(tiny_model_dir)[0], calibration_windows, BASE, target, CPU)
    assert again.plan == chosen.plan  # deterministic


def test_a_target_mixing_fp16_and_4_bit_adapters_stores_each_as_planned(tiny_model_dir, calibration_windows,
                                                                         tmp_path):
    out = tmp_path / "out"
    chosen, result, info, reference = run_target(tiny_model_dir, calibration_windows, BASE, MIXED_ADAPTERS, out)
    precisions = {name: option.adapter_bits for name, option in chosen.chosen.items() if option.rank}
    assert set(precisions.values()) == {None, 4}  # the plan mixes them
    assert {name: chosen.plan.compensation_for(name).adapter_bits for name in precisions} == precisions
    assert {name: m.adapter_bits for name, m in result.modules.items() if m.rank} == precisions
    assert {name: m["adapter_bits"] for name, m in info.manifest["modules"].items() if m["rank"]} == precisions
    summary = planning_summary(MIXED_ADAPTERS, chosen)["modules"]
    assert {name: m["adapter_bits"] for name, m in summary.items() if m["rank"]} == precisions
    # Module by module, the bytes the plan counted are the tensors the files hold (checkpoint and adapter file).
    linear = module_bytes(out, result.modules)
    for name, option in chosen.chosen.items():
        assert sum(linear[name].values()) + info.adapter.module_bytes.get(name, 0) == option.bytes, name
    with safe_open(out / "adapter" / "adapter_quantized.safetensors", "pt") as handle:
        in_file = sum(handle.get_tensor(key).nbytes for key in handle.keys())
    assert in_file == info.adapter.stored_bytes
    assert sum(sum(parts.values()) for parts in linear.values()) + in_file == chosen.allocation.bytes <= chosen.budget
    # The card's recipe, run as a user runs it, writes the PEFT adapter the job evaluated.
    user_copy = tmp_path / "user"
    shutil.copytree(out, user_copy)
    done = subprocess.run([sys.executable, "-c", card_recipe((out / "README.md").read_text())], cwd=user_copy,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (user_copy / "adapter" / "adapter_quantized.safetensors").unlink()  # PEFT reads only what the recipe wrote
    cold = logits_of(load_export(user_copy), calibration_windows[:VERIFY_WINDOWS])
    torch.testing.assert_close(cold, reference, atol=1e-4, rtol=1e-4)


def test_a_vllm_target_keeps_fused_sets_on_one_scheme(tiny_model_dir, calibration_windows, tmp_path):
    chosen, result, info, _ = run_target(tiny_model_dir, calibration_windows, BASE, VLLM, tmp_path / "out")
    assert info.sizes["bits_per_weight_served"] <= VLLM.bits_per_weight
    assert stored_bytes(info, result) - info.sizes["adapter_stored_bytes"] + info.sizes["adapter_served_bytes"] == \
        chosen.allocation.bytes
    scheme = {name: (m.quantized.bits, m.quantized.group_size) for name, m in result.modules.items()}
    assert {bits for bits, _ in scheme.values()} <= {4, 8}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        assert len({scheme[f"{prefix}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}) == 1
        assert len({scheme[f"{prefix}.mlp.{p}"] for p in ("gate_proj", "up_proj")}) == 1
    assert {m.rank for m in result.modules.values()} <= {0, 8, 16}
    assert info.manifest["serving"]["vllm"]["serves"] is True


def unmeasured_model(model_dir, monkeypatch):
    """(the model, its decoder Linears' shapes), with any measurement failing: a refusal comes before any work."""
    def no_work(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(target_module, "output_sensitivity", no_work)
    monkeypatch.setattr(target_module, "measure_options", no_work)
    model, _ = load_model(model_dir)
    return model, decoder_shapes(model)


def decoder_shapes(model) -> list[tuple[int, int]]:
    return [(linear.out_features, linear.in_features) for name, linear in model.named_modules()
            if isinstance(linear, torch.nn.Linear) and name.startswith("model.layers.")]


def test_an_impossible_target_fails_before_any_work(tiny_model_dir, calibration_windows, monkeypatch):
    model, shapes = unmeasured_model(tiny_model_dir, monkeypatch)
    # The cheapest option: 2-bit, one asymmetric group per row, no adapter.
    smallest = sum(sum(pack_quantized_bytes(d_out, d_in, 2, -1, False, 4).values()) for d_out, d_in in shapes)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    impossible = SizeTarget(**{**ANY.__dict__, "bits_per_weight": 2.0})
    with pytest.raises(TargetError, match=f"stores {8 * smallest / weights:.4f} bits per weight "
                                          f"\\({smallest:,} bytes over {weights:,} Linear weights\\)"):
        plan_for_target(model, calibration_windows, BASE, impossible, CPU)


def test_scales_are_counted_at_the_width_asked_for(tiny_model_dir, calibration_windows):
    """The benchmarks compute in fp32 and count fp16 scales: a budget between the two counts of the one
    plan offered (2-bit, per channel) is met only with scale_bytes=2, and then spent as counted so."""
    model, _ = load_model(tiny_model_dir)
    shapes = decoder_shapes(model)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    counted = {width: sum(sum(pack_quantized_bytes(d_out, d_in, 2, -1, False, width).values()) for d_out, d_in in shapes)
               for width in (2, 4)}
    between = SizeTarget(bits_per_weight=4 * (counted[2] + counted[4]) / weights, engine="transformers", bits=(2,),
                         group_sizes=(-1,), ranks=(0,), measure_with="rtn")
    plain = CompressionPlan(quant=quant(method="rtn"))
    with pytest.raises(TargetError, match="cannot be met"):
        plan_for_target(model, calibration_windows, plain, between, CPU)  # fp32 model: 4-byte scales
    chosen = plan_for_target(model, calibration_windows, plain, SizeTarget(**{**between.__dict__, "scale_bytes": 2}),
                             CPU)
    assert chosen.allocation.bytes == counted[2] <= chosen.budget


def test_vllm_targets_refuse_what_vllm_does_not_load():
    with pytest.raises(TargetError, match="vLLM loads"):
        SizeTarget(**{**VLLM.__dict__, "bits": (3, 4)})
    with pytest.raises(TargetError, match="adapter ranks"):
        SizeTarget(**{**VLLM.__dict__, "ranks": (0, 4)})
    with pytest.raises(TargetError, match="vLLM loads fp16 adapters"):
        SizeTarget(**{**VLLM.__dict__, "adapter_bits": (None, 4)})


def test_an_adapter_on_every_linear_is_counted_at_its_cheapest_precision(tiny_model_dir, calibration_windows,
                                                                         monkeypatch):
    """Without rank 0 every Linear stores an adapter: the smallest plan takes the 4-bit one, and a budget
    between that plan and the same with fp16 adapters fails only with fp16 alone."""
    model, shapes = unmeasured_model(tiny_model_dir, monkeypatch)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    smallest = {bits: sum(sum(pack_quantized_bytes(d_out, d_in, 2, -1, False, 4).values())
                          + adapter_size(d_out, d_in, 4, replace(BASE.compensation, adapter_bits=bits))[1]
                          for d_out, d_in in shapes) for bits in (None, 4)}
    assert smallest[4] < smallest[None]
    every = SizeTarget(bits_per_weight=2.0, engine="transformers", bits=(2, 3), group_sizes=(-1,), ranks=(4, 8),
                       adapter_bits=(None, 4), measure_with="rtn")
    with pytest.raises(TargetError, match=f"stores {8 * smallest[4] / weights:.4f} bits per weight "
                                          f"\\({smallest[4]:,} bytes"):
        plan_for_target(model, calibration_windows, BASE, every, CPU)
    between = 8 * (smallest[4] + smallest[None]) / 2 / weights
    with pytest.raises(TargetError, match=f"stores {8 * smallest[None] / weights:.4f} bits per weight"):
        plan_for_target(model, calibration_windows, BASE, replace(every, bits_per_weight=between, adapter_bits=(None,)),
                        CPU)
    with pytest.raises(AssertionError, match="measured before refusing"):  # it fits: planning goes on
        plan_for_target(model, calibration_windows, BASE, replace(every, bits_per_weight=between), CPU)


def test_a_jobs_target_offers_the_adapter_precisions_its_engine_loads():
    from app.jobs.spec import Target
    from worker.job_plan import TARGET_ADAPTER_BITS, size_target

    def offered(engine, compensation_spec):
        plan = CompressionPlan(quant=quant(method="rtn"), compensation=compensation_spec)
        return size_target(Target(bits_per_weight=4.0, engine=engine), plan, 64).adapter_bits

    assert TARGET_ADAPTER_BITS == (None, 8, 4)
    assert offered("transformers", compensation(method="eora", rank=8)) == (None, 8, 4)
    assert offered("transformers", compensation(method="eora", rank=8, adapter_bits=8)) == (8,)  # the spec fixes it
    assert offered("transformers", None) == offered("vllm", compensation(method="eora", rank=8)) == (None,)


def test_sensitivity_is_the_mean_squared_loss_gradient_at_each_output(tiny_model_dir, calibration_windows):
    """Against autograd the plain way: the outputs kept with retain_grad, parameters requiring gradients."""
    model, _ = load_model(tiny_model_dir)
    arch = get_architecture(model)
    sensitivity = output_sensitivity(model, arch, calibration_windows, batch_size=4)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no gradients left, flags restored
    name = "model.layers.0.mlp.down_proj"
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: outputs.append(out) or out.retain_grad())
    total = 0.0
    with torch.enable_grad():
        for batch in calibration_windows.split(4):
            loss = model(input_ids=batch, labels=batch).loss * batch.shape[0] * (batch.shape[1] - 1)
            loss.backward()
            total += float(outputs[-1].grad.double().square().sum())
    handle.remove()
    expected = total / (calibration_windows.numel() * model.get_submodule(name).out_features)
    assert sensitivity[name] == pytest.approx(expected, rel=1e-6)
    assert all(value > 0 for value in sensitivity.values())


def test_per_module_choices_need_a_plan_they_fit():
    with pytest.raises(ValueError, match="per-module quantizers need a plan that quantizes"):
        CompressionPlan(module_quant={"m": quant(method="rtn")})
    with pytest.raises(ValueError, match="per-module ranks need a fixed-rank compensation"):
        CompressionPlan(quant=quant(method="rtn"), compensation=compensation(budget_params=100), module_rank={"m": 4})
    with pytest.raises(ValueError, match="ranks in 0..max_rank"):
        CompressionPlan(quant=quant(method="rtn"), compensation=compensation(rank=4), module_rank={"m": -1})
    plan = CompressionPlan(quant=quant(method="rtn"), compensation=compensation(rank=4), module_rank={"m": 0})
    assert (plan.rank_for("m"), plan.rank_for("other")) == (0, 4)
    with pytest.raises(ValueError, match="per-module adapter precisions need a compensation"):
        CompressionPlan(quant=quant(method="rtn"), module_adapter_bits={"m": 4})
    with pytest.raises(ValueError, match="per-module adapter precisions need a compensation and bits in"):
        CompressionPlan(quant=quant(method="rtn"), compensation=compensation(rank=4), module_adapter_bits={"m": 3})
    plan = CompressionPlan(quant=quant(method="rtn"), compensation=compensation(rank=4, adapter_bits=8),
                           module_adapter_bits={"m": None, "n": 4})
    assert [plan.compensation_for(name).adapter_bits for name in ("m", "n", "other")] == [None, 4, 8]
    assert plan.compensation_for("m") == replace(plan.compensation, adapter_bits=None)
    with pytest.raises(ValueError, match="a size target needs a base plan with one quantizer and no per-module"):
        plan_for_target(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), plan, ANY, CPU)


def test_the_measuring_walk_keeps_its_activations_where_the_job_does_and_frees_them(tiny_model_dir,
                                                                                   calibration_windows, tmp_path,
                                                                                   monkeypatch):
    """A "disk" placement: the measuring walk's activations are files under the placement's folder (none left
    after), and the plan is the one the host placement gives."""
    from worker.activations import Activations, Placement

    made = []
    original = Activations.__init__

    def recording(self, placement, device):
        original(self, placement, device)
        made.append(self)

    monkeypatch.setattr(Activations, "__init__", recording)
    model = load_model(tiny_model_dir)[0]
    on_disk = plan_for_target(model, calibration_windows, BASE, ANY, CPU, placement=Placement("disk", tmp_path / "a"))
    assert [a.where for a in made] == ["disk"] and len(made[0]) == 0  # closed: its batches released
    assert list((tmp_path / "a").iterdir()) == []  # its folder of batch files removed
    on_host = plan_for_target(model, calibration_windows, BASE, ANY, CPU)
    assert made[1].where == "host" and len(made[1]) == 0
    assert on_disk.chosen == on_host.chosen


def test_the_sensitivity_and_the_curves_read_the_first_windows(tiny_model_dir, monkeypatch):
    """The backward pass sees the first SENSITIVITY_WINDOWS windows, the error curves' Grams the first
    CURVE_WINDOWS."""
    model, _ = load_model(tiny_model_dir)
    count = max(target_module.SENSITIVITY_WINDOWS, target_module.CURVE_WINDOWS) + 4
    windows = torch.randint(0, model.config.vocab_size, (count, 8), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    real_sensitivity, real_capture = target_module.output_sensitivity, target_module.capture_inputs

    def sensitivity(m, arch, read, batch_size):
        seen["sensitivity"] = read
        return real_sensitivity(m, arch, read, batch_size)

    def capture(source, read, *args):
        seen["curves"] = read
        return real_capture(source, read, *args)

    monkeypatch.setattr(target_module, "output_sensitivity", sensitivity)
    monkeypatch.setattr(target_module, "capture_inputs", capture)
    plan_for_target(model, windows, BASE, ANY, CPU)
    assert torch.equal(seen["sensitivity"], windows[: target_module.SENSITIVITY_WINDOWS])
    assert torch.equal(seen["curves"], windows[: target_module.CURVE_WINDOWS])
