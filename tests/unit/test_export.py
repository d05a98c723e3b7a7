"""Export round trips on a tiny LLaMA: compress -> in-memory logits -> export -> cold reload -> same logits.

The cold reload here is done by the test itself with transformers (+ CompressedTensorsConfig
(dequantize=True)) and PEFT, independently of verify_export, which is checked on top.

Tolerance: atol = rtol = 1e-4 on fp32 logits (|logit| <= ~0.7 on these models). The exported
weights are bit-identical to the in-memory ones (codes are read back from the file and compared),
so only the order of float operations could differ (measured: exactly 0). A corrupted scale moves
the logits by far more, which test_verify_fails_on_a_corrupted_scale checks.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.outputs import logits as logits_of
from tests.specs import compensation, job_plan, quant, sparsity
from worker.data import windows_hash
from worker.export import ExportError, export_model, reference_logits, verify_export
from worker.export.adapter import vllm_max_lora_rank
from worker.models import decoder_linears, get_architecture, load_model
from worker.plan import CompressionPlan, CompressionResult
from worker.sequential import compress_model
from worker.storage import sha256_file

CPU = torch.device("cpu")
ATOL = RTOL = 1e-4
VERIFY_WINDOWS = 4
BASE_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "squeeze.json",
              "tokenizer.json", "tokenizer_config.json"}
ADAPTER_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}

RTN4 = CompressionPlan(quant=quant(method="rtn", bits=4, group_size=32))
GPTQ4 = CompressionPlan(quant=quant(method="gptq", bits=4, group_size=32, symmetric=True, act_order=True))
GPTQ8 = CompressionPlan(quant=quant(method="gptq", bits=8, group_size=-1))
GPTQ3 = CompressionPlan(quant=quant(method="gptq", bits=3, group_size=16))
SPARSEGPT_24 = CompressionPlan(sparsity=sparsity(method="sparsegpt", n=2, m=4))
MAGNITUDE_24 = CompressionPlan(sparsity=sparsity(method="magnitude", n=2, m=4))
SPARSE_24_GPTQ4 = job_plan(sparsity={"method": "sparsegpt", "pattern": "2:4"},
                           quantization={"method": "gptq", "bits": 4, "group_size": 32})
EORA_MIXED = CompressionPlan(quant=quant(method="gptq", bits=4, group_size=32),
                             compensation=compensation(method="eora", budget_fraction=0.1))


def extra(windows, **evaluation):
    return {
        "job": {"model": {"id": "tiny-llama", "revision": "main"}, "destination": {"uri": None}},
        "model": {"id": "tiny-llama", "revision": "0123abcd", "source": "local"},
        "calibration": {"windows": list(windows.shape), "windows_sha256": windows_hash(windows)},
        "evaluation": evaluation or {"perplexity_after": 123.0},
    }


def compress_and_export(model_dir, windows, plan, out_dir, dtype=torch.float32):
    model, tokenizer = load_model(model_dir, dtype=dtype)
    result = compress_model(model, windows, plan, CPU)
    reference = reference_logits(model, windows[:VERIFY_WINDOWS])
    info = export_model(model, tokenizer, result, plan, out_dir, extra(windows))
    return result, reference, info


def cold_load(out_dir, adapter=True):
    """As a user would: transformers (dequantizing compressed-tensors weights), then PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((out_dir / "config.json").read_text())
    quantized = "quantization_config" in config
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(out_dir, **kwargs)
    if adapter and (out_dir / "adapter").is_dir():
        model = PeftModel.from_pretrained(model, out_dir / "adapter")
    return model.eval()


def tensors(path):
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def unpack(packed, bits, shape, packed_dim=1):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=packed_dim).to(torch.int16)


@pytest.mark.parametrize("plan", [RTN4, GPTQ4, GPTQ8, GPTQ3, SPARSE_24_GPTQ4],
                         ids=["rtn4", "gptq4-sym-actorder", "gptq8-channel", "gptq3", "sparsegpt24-gptq4"])
def test_quantized_round_trip(plan, tiny_model_dir, calibration_windows, tmp_path):
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, plan, tmp_path / "out")
    out = info.out_dir
    assert set(info.files) == BASE_FILES

    quant = plan.quant
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert weights["num_bits"] == quant.bits and weights["symmetric"] == quant.symmetric
    if quant.group_size == -1:
        assert weights["strategy"] == "channel"
    else:
        assert (weights["strategy"], weights["group_size"]) == ("group", quant.group_size)
    assert qconfig["ignore"] == ["lm_head"]

    # The file holds our codes, read back independently of the exporter's own check.
    stored = tensors(out / "model.safetensors")
    offset = 2 ** (quant.bits - 1)
    for name, report in result.modules.items():
        q = report.quantized
        assert f"{name}.weight" not in stored
        assert torch.equal(unpack(stored[f"{name}.weight_packed"], quant.bits, q.codes.shape),
                           q.codes.to(torch.int16) - offset), name
        assert torch.equal(stored[f"{name}.weight_scale"], q.scales)
        if quant.symmetric:
            assert f"{name}.weight_zero_point" not in stored
        else:
            zero_points = unpack(stored[f"{name}.weight_zero_point"], quant.bits, q.zeros.shape, packed_dim=0)
            assert torch.equal(zero_points, q.zeros.to(torch.int16) - offset), name

    # The sizes the job reports are the file's tensors, counted here from the tensors themselves.
    def stored_bytes(suffix):
        return sum(t.numel() * t.element_size() for key, t in stored.items()
                   if key.endswith(suffix) and key.rsplit(".", 1)[0] in result.modules)

    sizes, weights = info.sizes, sum(d_out * d_in for d_out, d_in in (m.shape for m in result.modules.values()))
    assert sizes["linear_weights"] == weights
    assert sizes["codes_bytes"] == stored_bytes(".weight_packed") > 0
    assert sizes["scales_bytes"] == stored_bytes(".weight_scale") > 0
    assert sizes["zero_points_bytes"] == stored_bytes(".weight_zero_point")
    assert sizes["other_bytes"] == stored_bytes(".weight_shape") and sizes["adapter_stored_bytes"] == 0
    if quant.bits in (4, 8):  # whole codes per int32 word
        assert 8 * sizes["codes_bytes"] == quant.bits * weights
    parts = sum(sizes[f"{part}_bytes"] for part in ("codes", "scales", "zero_points", "other"))
    assert sizes["bits_per_weight_stored"] == sizes["bits_per_weight_served"] == 8 * parts / weights

    cold = logits_of(cold_load(out), calibration_windows[:VERIFY_WINDOWS])
    torch.testing.assert_close(cold, reference, atol=ATOL, rtol=RTOL)
    verified = verify_export(out, reference, calibration_windows[:VERIFY_WINDOWS])
    assert verified.max_abs_diff <= ATOL and (verified.atol, verified.rtol) == (ATOL, RTOL)
    assert verified.adapter is False and verified.windows == VERIFY_WINDOWS


@pytest.mark.parametrize("plan", [SPARSEGPT_24, MAGNITUDE_24], ids=["sparsegpt24", "magnitude24"])
def test_sparse_only_round_trip_is_dense_with_zeros(plan, tiny_model_dir, calibration_windows, tmp_path):
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, plan, tmp_path / "out")
    out = info.out_dir
    assert set(info.files) == BASE_FILES
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    stored = load_file(out / "model.safetensors")
    for name in result.modules:
        weight = stored[f"{name}.weight"]  # (d_out, d_in)
        zeros_per_block = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1)
        assert bool((zeros_per_block >= 2).all()), name
    manifest = info.manifest
    assert manifest["checkpoint"]["format"] == "dense"
    assert all(m["sparsity"] == "2:4" and m["zero_fraction"] >= 0.5 for m in manifest["modules"].values())
    assert any("vLLM no longer accelerates 2:4" in note for note in manifest["notes"])
    assert manifest["serving"]["vllm"]["scheme"] == "unquantized (dense weights)"

    cold = logits_of(cold_load(out), calibration_windows[:VERIFY_WINDOWS])
    torch.testing.assert_close(cold, reference, atol=ATOL, rtol=RTOL)
    assert verify_export(out, reference, calibration_windows[:VERIFY_WINDOWS]).max_abs_diff <= ATOL


def test_mixed_rank_eora_adapter_round_trip(tiny_model_dir, calibration_windows, tmp_path):
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, EORA_MIXED, tmp_path / "out")
    out = info.out_dir
    ranks = {name: m.rank for name, m in result.modules.items() if m.rank > 0}
    assert len(set(ranks.values())) > 2, f"the budget should give differing ranks, got {ranks}"
    assert set(info.files) == BASE_FILES | ADAPTER_FILES

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    default = config["r"]
    assert config["lora_alpha"] == default and config["base_model_name_or_path"] == ".."
    assert sorted(config["target_modules"]) == sorted(ranks)  # rank-0 modules carry no adapter
    assert config["rank_pattern"] == {name: r for name, r in ranks.items() if r != default}
    assert config["alpha_pattern"] == config["rank_pattern"]  # alpha = r: scaling 1 everywhere
    assert all(key.startswith("model.layers.") for key in config["rank_pattern"])  # full paths

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * len(ranks)
    for name, rank in ranks.items():
        assert weights[f"base_model.model.{name}.lora_A.weight"].shape == (rank, result.modules[name].shape[1])
        assert weights[f"base_model.model.{name}.lora_B.weight"].shape == (result.modules[name].shape[0], rank)

    peft_model = cold_load(out)
    for name, rank in ranks.items():
        lora = peft_model.base_model.model.get_submodule(name)
        assert lora.r["default"] == rank and lora.scaling["default"] == 1.0, name
    windows = calibration_windows[:VERIFY_WINDOWS]
    torch.testing.assert_close(logits_of(peft_model, windows), reference, atol=ATOL, rtol=RTOL)
    # The adapter carries real signal: without it the logits are far outside the tolerance.
    without = logits_of(cold_load(out, adapter=False), windows)
    assert (without - reference).abs().max() > 100 * ATOL

    sizes = info.sizes  # an adapter adds its stored bytes, and fp16 bytes when served
    assert sizes["adapter_stored_bytes"] == result.adapter_bytes and sizes["adapter_served_bytes"] == 2 * sum(
        t.numel() for t in weights.values())
    assert sizes["bits_per_weight_served"] - sizes["bits_per_weight_stored"] == pytest.approx(
        8 * (sizes["adapter_served_bytes"] - sizes["adapter_stored_bytes"]) / sizes["linear_weights"])

    manifest = info.manifest
    assert manifest["adapter"]["max_rank"] == max(ranks.values())
    assert manifest["serving"]["vllm"]["lora"] == {"enable_lora": True,
                                                   "max_lora_rank": vllm_max_lora_rank(max(ranks.values()))}
    card = (out / "README.md").read_text()
    assert f"--enable-lora --max-lora-rank {vllm_max_lora_rank(max(ranks.values()))}" in card
    assert "PeftModel.from_pretrained" in card and "CompressedTensorsConfig(dequantize=True)" in card
    verified = verify_export(out, reference, windows)
    assert verified.adapter is True and verified.max_abs_diff <= ATOL


def test_sparse_model_with_a_fixed_rank_adapter_round_trip(tiny_model_dir, calibration_windows, tmp_path):
    plan = CompressionPlan(sparsity=sparsity(method="wanda", n=2, m=4),
                           compensation=compensation(method="eora", rank=4))
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, plan, tmp_path / "out")
    assert set(info.files) == BASE_FILES | ADAPTER_FILES
    config = json.loads((info.out_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4, {})
    assert sorted(config["target_modules"]) == sorted(result.modules)
    cold = logits_of(cold_load(info.out_dir), calibration_windows[:VERIFY_WINDOWS])
    torch.testing.assert_close(cold, reference, atol=ATOL, rtol=RTOL)


def test_manifest_records_job_versions_errors_and_checksums(tiny_model_dir, calibration_windows, tmp_path):
    result, _, info = compress_and_export(tiny_model_dir, calibration_windows, EORA_MIXED, tmp_path / "out")
    manifest = json.loads((info.out_dir / "squeeze.json").read_text())
    assert manifest["model"]["revision"] == "0123abcd"
    assert manifest["calibration"]["windows_sha256"] == windows_hash(calibration_windows)
    assert manifest["evaluation"] == {"perplexity_after": 123.0}
    assert manifest["job"]["model"]["id"] == "tiny-llama"
    import compressed_tensors
    import peft
    import transformers

    assert manifest["libraries"]["transformers"] == transformers.__version__
    assert manifest["libraries"]["compressed-tensors"] == compressed_tensors.__version__
    assert manifest["libraries"]["peft"] == peft.__version__
    assert manifest["libraries"]["torch"] == torch.__version__ and manifest["libraries"]["squeeze"]
    for name, m in result.modules.items():
        entry = manifest["modules"][name]
        assert (entry["rank"], entry["error_before"], entry["error_after"]) == (m.rank, m.error_before, m.error_after)
    assert set(manifest["files"]) == set(info.files) - {"squeeze.json"}
    for relative, entry in manifest["files"].items():
        path = info.out_dir / relative
        assert entry == {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def test_eight_bit_codes_survive_a_bfloat16_model(tiny_model_dir, calibration_windows, tmp_path):
    """In bf16, (code - zero) * scale is rounded; compressed-tensors re-deriving 8-bit codes from that
    rounded weight would land on a neighbouring code. The exporter hands it the exact fp32 grid."""
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, GPTQ8, tmp_path / "out",
                                                  dtype=torch.bfloat16)
    stored = tensors(info.out_dir / "model.safetensors")
    for name, report in result.modules.items():
        assert torch.equal(unpack(stored[f"{name}.weight_packed"], 8, report.quantized.codes.shape),
                           report.quantized.codes.to(torch.int16) - 128), name
    assert stored[f"{next(iter(result.modules))}.weight_scale"].dtype == torch.bfloat16
    # No adapter: the reloaded bf16 model is bit-identical.
    verified = verify_export(info.out_dir, reference, calibration_windows[:VERIFY_WINDOWS])
    assert verified.max_abs_diff == 0.0


def test_verify_fails_on_a_corrupted_scale(tiny_model_dir, calibration_windows, tmp_path):
    _, reference, info = compress_and_export(tiny_model_dir, calibration_windows, RTN4, tmp_path / "out")
    path = info.out_dir / "model.safetensors"
    stored = tensors(path)
    key = "model.layers.1.mlp.down_proj.weight_scale"
    stored[key] = stored[key].clone()
    stored[key][0, 0] *= 1.5  # one group of 32 weights in one row of one layer
    save_file(stored, path, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="does not reproduce the compressed model"):
        verify_export(info.out_dir, reference, calibration_windows[:VERIFY_WINDOWS])


def test_verify_fails_when_an_adapter_module_is_wrong(tiny_model_dir, calibration_windows, tmp_path):
    result, reference, info = compress_and_export(tiny_model_dir, calibration_windows, EORA_MIXED, tmp_path / "out")
    path = info.out_dir / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    adapted = next(name for name, m in result.modules.items() if m.rank > 0)
    weights[f"base_model.model.{adapted}.lora_B.weight"].zero_()
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"max \|logit difference\|"):
        verify_export(info.out_dir, reference, calibration_windows[:VERIFY_WINDOWS])


def test_export_refuses_weights_off_the_reported_grid(tiny_model_dir, calibration_windows, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    result = compress_model(model, calibration_windows, RTN4, CPU)
    name = "model.layers.0.self_attn.q_proj"
    codes = result.modules[name].quantized.codes
    codes[0, 0] = (int(codes[0, 0]) + 1) % 16
    with pytest.raises(ExportError, match=f"{name}: the model's weight is not the dequantized value"):
        export_model(model, tokenizer, result, RTN4, tmp_path / "out", extra(calibration_windows))


def test_export_refuses_widths_pack_quantized_cannot_hold(tiny_llama, tiny_tokenizer, calibration_windows, tmp_path):
    plan = CompressionPlan(quant=replace(quant(method="rtn"), bits=16))  # beyond what the job spec allows
    with pytest.raises(ExportError, match="16-bit weights cannot be exported.*1..8-bit"):
        export_model(tiny_llama, tiny_tokenizer, CompressionResult(modules={}), plan, tmp_path / "out",
                     extra(calibration_windows))


def test_export_refuses_a_non_empty_folder_and_incomplete_manifest_extra(tiny_llama, tiny_tokenizer,
                                                                          calibration_windows, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="not empty"):
        export_model(tiny_llama, tiny_tokenizer, CompressionResult(modules={}), RTN4, tmp_path / "out",
                     extra(calibration_windows))
    with pytest.raises(ValueError, match="manifest_extra lacks calibration, evaluation"):
        export_model(tiny_llama, tiny_tokenizer, CompressionResult(modules={}), RTN4, tmp_path / "new",
                     {"job": {}, "model": {}})
    with pytest.raises(ValueError, match="may not set files"):
        export_model(tiny_llama, tiny_tokenizer, CompressionResult(modules={}), RTN4, tmp_path / "new",
                     {**extra(calibration_windows), "files": {}})


def test_three_bit_artifacts_are_not_claimed_for_vllm(tiny_model_dir, calibration_windows, tmp_path):
    _, _, info = compress_and_export(tiny_model_dir, calibration_windows, GPTQ3, tmp_path / "out")
    vllm = info.manifest["serving"]["vllm"]
    assert vllm["serves"] is False and "4- and 8-bit" in vllm["reason"]
    assert "Not served" in (info.out_dir / "README.md").read_text()


@pytest.mark.parametrize(("max_rank", "expected"), [(1, 8), (8, 8), (9, 16), (200, 256), (257, 320), (321, 512),
                                                    (512, 512), (513, None)])
def test_vllm_max_lora_rank_rounds_up_to_an_accepted_value(max_rank, expected):
    assert vllm_max_lora_rank(max_rank) == expected


def test_every_decoder_linear_is_quantized_and_nothing_else(tiny_model_dir, calibration_windows, tmp_path):
    """Embeddings, norms and the (tied) head stay in full precision."""
    result, _, info = compress_and_export(tiny_model_dir, calibration_windows, RTN4, tmp_path / "out")
    model, _ = load_model(tiny_model_dir)
    assert set(result.modules) == set(decoder_linears(model, get_architecture(model)))
    stored = tensors(info.out_dir / "model.safetensors")
    packed = {key.removesuffix(".weight_packed") for key in stored if key.endswith(".weight_packed")}
    assert packed == set(result.modules)
    assert stored["model.embed_tokens.weight"].dtype == torch.float32


def test_what_the_model_card_says_about_loading_is_what_works(tiny_model_dir, calibration_windows, tmp_path):
    """Asymmetric checkpoints (the default grid): plain from_pretrained fails (compressed-tensors 0.20,
    transformers 5.24: weight_zero_point shape mismatch); the card's dequantize=True load matches.
    Symmetric ones load both ways. When a library release changes this, this test says the docs must."""
    from transformers import AutoModelForCausalLM

    windows = calibration_windows[:VERIFY_WINDOWS]
    _, reference, asymmetric = compress_and_export(tiny_model_dir, calibration_windows, RTN4, tmp_path / "asym")
    card = (asymmetric.out_dir / "README.md").read_text()
    assert "quantization_config=CompressedTensorsConfig(dequantize=True))" in card
    assert "fails on asymmetric ones (`weight_zero_point` shape mismatch)" in card
    assert any("plain AutoModelForCausalLM.from_pretrained(path) fails" in note for note in asymmetric.notes)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(asymmetric.out_dir)
    torch.testing.assert_close(logits_of(cold_load(asymmetric.out_dir), windows), reference, atol=ATOL, rtol=RTOL)

    _, reference, symmetric = compress_and_export(tiny_model_dir, calibration_windows, GPTQ4, tmp_path / "sym")
    assert not any("plain AutoModelForCausalLM" in note for note in symmetric.notes)
    plain = AutoModelForCausalLM.from_pretrained(symmetric.out_dir).eval()
    torch.testing.assert_close(logits_of(plain, windows), reference, atol=ATOL, rtol=RTOL)


def test_run_notes_reach_the_manifest_and_the_model_card(tiny_model_dir, calibration_windows, tmp_path):
    """A capped rank request is said in squeeze.json and README.md, before the serving notes."""
    plan = CompressionPlan(quant=quant(method="rtn", bits=4, group_size=32), compensation=compensation(rank=512))
    result, _, info = compress_and_export(tiny_model_dir, calibration_windows, plan, tmp_path / "out")
    assert result.notes and "dense-delta crossover" in result.notes[0]
    assert info.manifest["notes"][: len(result.notes)] == result.notes
    saved = json.loads((info.out_dir / "squeeze.json").read_text())
    assert saved["notes"] == info.manifest["notes"]
    assert result.notes[0] in (info.out_dir / "README.md").read_text()
