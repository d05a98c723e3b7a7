"""The adapter stores what is counted: fp16 PEFT factors, or packed integer codes + fp16 scales (with the
fp16 factors of the modules a plan keeps in fp16, when precisions are mixed).

Sizes are read back from the safetensors files tensor by tensor and compared with squeeze.json and
the compression report; the quantized form is turned back into a PEFT adapter by the model card's
own recipe (its code block executed as a user would run it) and must give the in-memory factors bit
for bit. Tolerances on logits as in test_export.py (atol = rtol = 1e-4, fp32).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.specs import MIXED_ADAPTER_BITS, compensation, quant
from tests.unit.test_export import ATOL, CPU, RTOL, VERIFY_WINDOWS, cold_load, extra, logits_of
from worker.compression.adapters import FACTOR_DTYPE, quantize_adapter, stored_adapter
from worker.export import export_model, reference_logits, verify_export
from worker.export.adapter import DEQUANTIZE_RECIPE, pack_bits, save_adapter
from worker.linear_compress import unwrap_adapters
from worker.models import load_model
from worker.plan import CompressionPlan
from worker.sequential import compress_model

GPTQ4 = quant(method="gptq", bits=4, group_size=32)


def file_tensors(path):
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def export_with_adapters(model_dir, windows, compensation, out_dir, module_adapter_bits=None):
    """Compress, keep a copy of the in-memory adapters, export; (result, adapters, reference, info)."""
    plan = CompressionPlan(quant=GPTQ4, compensation=compensation, module_adapter_bits=module_adapter_bits or {})
    model, tokenizer = load_model(model_dir)
    result = compress_model(model, windows, plan, CPU)
    reference = reference_logits(model, windows[:VERIFY_WINDOWS])
    adapters = {name: (m.lora_B.clone(), m.lora_A.clone(), m.quantized)
                for name, m in model.named_modules() if hasattr(m, "lora_A")}
    info = export_model(model, tokenizer, result, plan, out_dir, extra(windows))
    return result, adapters, reference, info


def test_fp16_adapter_file_holds_the_evaluated_factors_and_the_counted_bytes(tiny_model_dir, calibration_windows,
                                                                            tmp_path):
    result, adapters, reference, info = export_with_adapters(
        tiny_model_dir, calibration_windows, compensation(method="eora", rank=8), tmp_path / "out")
    weights, _ = file_tensors(info.out_dir / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    for name, (lora_b, lora_a, quantized) in adapters.items():
        assert quantized is None
        assert torch.equal(weights[f"base_model.model.{name}.lora_A.weight"], lora_a), name
        assert torch.equal(weights[f"base_model.model.{name}.lora_B.weight"], lora_b), name
        report = result.modules[name]
        tensor_bytes = (weights[f"base_model.model.{name}.lora_A.weight"].nbytes
                        + weights[f"base_model.model.{name}.lora_B.weight"].nbytes)
        assert tensor_bytes == report.adapter_bytes == 2 * report.adapter_params, name
    manifest = json.loads((info.out_dir / "squeeze.json").read_text())["adapter"]
    stored = sum(t.nbytes for t in weights.values())
    assert manifest["stored_dtype"] == "float16" and manifest["file"] == "adapter/adapter_model.safetensors"
    assert manifest["stored_bytes"] == stored == result.adapter_bytes
    assert manifest["served_bytes"] == 2 * manifest["params"] == stored
    assert manifest["stored_bits_per_param"] == manifest["served_bits_per_param"] == 16.0
    verified = verify_export(info.out_dir, reference, calibration_windows[:VERIFY_WINDOWS])
    assert verified.adapter and verified.max_abs_diff <= ATOL


def card_recipe(card: str) -> str:
    """The Python block of the model card's "quantized adapter" section, verbatim."""
    section = card.split("## The quantized adapter", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.parametrize("module_adapter_bits", [{}, MIXED_ADAPTER_BITS], ids=["4-bit", "fp16/4/8-bit"])
def test_quantized_adapter_stores_packed_codes_and_the_card_recipe_rebuilds_the_factors(
        module_adapter_bits, tiny_model_dir, calibration_windows, tmp_path):
    spec = compensation(method="eora", rank=8, adapter_bits=4, adapter_group_size=32)
    result, adapters, reference, info = export_with_adapters(tiny_model_dir, calibration_windows, spec,
                                                             tmp_path / "out", module_adapter_bits)
    out = info.out_dir
    assert not (out / "adapter" / "adapter_model.safetensors").exists()  # only the counted form is stored
    tensors, metadata = file_tensors(out / "adapter" / "adapter_quantized.safetensors")
    factors = json.loads(metadata["squeeze"])["factors"]
    manifest = json.loads((out / "squeeze.json").read_text())

    # Tensor by tensor: dtypes and byte counts are the accounting's, per module and in total.
    for name, (lora_b, lora_a, quantized) in adapters.items():
        bits = module_adapter_bits.get(name, 4)
        assert result.modules[name].adapter_bits == manifest["modules"][name]["adapter_bits"] == bits, name
        if bits is None:  # stored as PEFT stores it, in the same file
            assert quantized is None
            assert all(f"base_model.model.{name}.lora_{factor}" not in factors for factor in "AB")
            stored_fp16 = (tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"])
            assert stored_fp16[0].dtype == stored_fp16[1].dtype == torch.float16
            assert torch.equal(stored_fp16[0], lora_a) and torch.equal(stored_fp16[1], lora_b), name
            assert sum(t.nbytes for t in stored_fp16) == result.modules[name].adapter_bytes == \
                2 * result.modules[name].adapter_params, name
            continue
        module_bytes = 0
        quantized_b, quantized_a = quantized
        for factor, q in (("A", quantized_a), ("B", quantized_b)):
            key = f"base_model.model.{name}.lora_{factor}"
            rows, dim = q.codes.shape
            groups = rows * (dim // q.group_size)
            per_byte = 8 // bits
            assert q.bits == bits and factors[key] == [rows, dim, q.group_size, bits] and f"{key}.weight" not in tensors
            assert tensors[f"{key}.codes"].dtype == torch.uint8 and tensors[f"{key}.codes"].numel() == rows * dim // per_byte
            assert tensors[f"{key}.zeros"].dtype == torch.uint8 and tensors[f"{key}.zeros"].numel() == -(-groups // per_byte)
            assert tensors[f"{key}.scales"].dtype == torch.float16 and tensors[f"{key}.scales"].shape == (rows, groups // rows)
            module_bytes += sum(tensors[f"{key}.{part}"].nbytes for part in ("codes", "zeros", "scales"))
        assert module_bytes == result.modules[name].adapter_bytes, name
    stored = sum(t.nbytes for t in tensors.values())
    assert info.adapter.module_bytes == {name: m.adapter_bytes for name, m in result.modules.items()}
    manifest = manifest["adapter"]
    assert manifest["stored_bytes"] == stored == result.adapter_bytes
    assert manifest["served_bytes"] == 2 * manifest["params"] == 2 * result.adapter_params
    assert manifest["stored_bits_per_param"] == pytest.approx(8 * stored / manifest["params"])
    assert 4.0 < manifest["stored_bits_per_param"] < 8.0 and manifest["served_bits_per_param"] == 16.0
    assert manifest["stored_dtype"] == ("int4 codes and zero points, float16 group scales" if not module_adapter_bits
                                        else "int4 and int8 codes and zero points, float16 group scales; "
                                        "float16 factors for 2 of 14 modules")
    card = (out / "README.md").read_text()
    assert '/adapter")  # on the model loaded above (after the recipe above)' in card
    assert "Run the recipe above first: vLLM loads `adapter/adapter_model.safetensors`." in card

    # The card's recipe, run as a user runs it (its own process, inside the artifact folder).
    user_copy = tmp_path / "user"
    shutil.copytree(out, user_copy)
    recipe = card_recipe((out / "README.md").read_text())
    done = subprocess.run([sys.executable, "-c", recipe], cwd=user_copy, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    rebuilt, _ = file_tensors(user_copy / "adapter" / "adapter_model.safetensors")
    assert len(rebuilt) == 2 * len(adapters)
    for name, (lora_b, lora_a, _) in adapters.items():
        assert torch.equal(rebuilt[f"base_model.model.{name}.lora_A.weight"], lora_a), name
        assert torch.equal(rebuilt[f"base_model.model.{name}.lora_B.weight"], lora_b), name
    # ... and the rebuilt folder is a PEFT adapter giving the evaluated model's logits.
    cold = logits_of(cold_load(user_copy), calibration_windows[:VERIFY_WINDOWS])
    torch.testing.assert_close(cold, reference, atol=ATOL, rtol=RTOL)
    verified = verify_export(out, reference, calibration_windows[:VERIFY_WINDOWS])
    assert verified.adapter and verified.max_abs_diff <= ATOL
    assert not (out / "adapter" / "adapter_model.safetensors").exists()  # verification worked on a copy


def test_the_recipe_reads_files_written_before_per_module_precisions(tmp_path):
    """Older files list [rows, dim, group_size] per factor and one "bits" for every factor."""
    generator = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.up_proj"
    adapter = stored_adapter(torch.randn(32, 4, generator=generator), torch.randn(4, 64, generator=generator), 4, 16,
                             name)
    save_adapter({name: adapter}, tmp_path)
    folder = tmp_path / "adapter"
    tensors, metadata = file_tensors(folder / "adapter_quantized.safetensors")
    factors = json.loads(metadata["squeeze"])["factors"]
    assert {len(entry) for entry in factors.values()} == {4}
    old = {"bits": 4, "factors": {key: entry[:3] for key, entry in factors.items()}}
    save_file(tensors, folder / "adapter_quantized.safetensors", metadata={"squeeze": json.dumps(old)})
    exec(compile(DEQUANTIZE_RECIPE, "model card recipe", "exec"), {"folder": str(folder)})  # noqa: S102
    rebuilt, _ = file_tensors(folder / "adapter_model.safetensors")
    assert torch.equal(rebuilt[f"base_model.model.{name}.lora_A.weight"], adapter.lora_a)
    assert torch.equal(rebuilt[f"base_model.model.{name}.lora_B.weight"], adapter.lora_b)


def test_in_memory_factors_are_the_dequantized_stored_codes(tiny_llama, calibration_windows):
    spec = compensation(method="svd", rank=6, adapter_bits=8, adapter_group_size=16)
    result = compress_model(tiny_llama, calibration_windows, CompressionPlan(quant=GPTQ4, compensation=spec), CPU)
    adapters = unwrap_adapters(tiny_llama)
    assert len(adapters) == len(result.modules)
    for adapter in adapters.values():
        quantized_b, quantized_a = adapter.quantized
        assert adapter.lora_a.dtype == adapter.lora_b.dtype == FACTOR_DTYPE
        assert torch.equal(adapter.lora_a, quantized_a.dequantize()) and torch.equal(adapter.lora_b, quantized_b.dequantize())
        assert (quantized_b.group_size, quantized_a.group_size) == (6, 16)  # rank 6 <= 16: one group per row of B


def test_pack_bits_is_dense_and_low_bits_first():
    four = pack_bits(torch.tensor([1, 2, 3, 15, 7], dtype=torch.uint8), 4)
    assert four.dtype == torch.uint8 and four.tolist() == [1 | 2 << 4, 3 | 15 << 4, 7]  # odd count: high nibble 0
    assert pack_bits(torch.tensor([1, 200, 255], dtype=torch.uint8), 8).tolist() == [1, 200, 255]
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack_bits(torch.tensor([16], dtype=torch.uint8), 4)


def test_quantize_adapter_keeps_fp16_scales_that_rederive_its_codes():
    a = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    q = quantize_adapter(a, 4, 64)  # groups of 48
    assert q.scales.dtype == torch.float16 and q.scales.shape == (8, 2) and q.group_size == 48
    x = a.to(torch.float16).float().reshape(8, 2, 48)
    codes = torch.clamp(torch.round(x / q.scales.float().unsqueeze(-1)) + q.zeros.float().unsqueeze(-1), 0, 15)
    assert torch.equal(codes.reshape(8, 96).to(torch.uint8), q.codes)
