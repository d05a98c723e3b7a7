"""Mixed precision: a plan with per-module quantizers exports one compressed-tensors config group per
scheme, counts each Linear's bytes from the files exactly as the size formula predicts, and loads back
through the model card's recipe (and the export check) with the in-memory model's logits.

Tolerance: atol = rtol = 1e-4 on fp32 logits, as tests/unit/test_export.py (weights bit-identical,
only the order of float operations could differ).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.specs import quant
from tests.unit.test_export import ATOL, RTOL, VERIFY_WINDOWS, compress_and_export, logits_of, tensors, unpack
from worker.export import ExportError, verify_export
from worker.export.checkpoint import PACK_QUANTIZED, CheckpointInfo, StoredScheme
from worker.export.manifest import serving
from worker.export.sizes import module_bytes, pack_quantized_bytes
from worker.plan import CompressionPlan

LAYERS = range(2)  # tests/fixtures_models.TINY_DIMS
ATTENTION = [f"model.layers.{i}.self_attn.{p}" for i in LAYERS for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
MLP = [f"model.layers.{i}.mlp.{p}" for i in LAYERS for p in ("gate_proj", "up_proj", "down_proj")]
ATTENTION_QUANT = quant(method="gptq", bits=4, group_size=32)  # asymmetric (the job spec's default)
MLP_QUANT = quant(method="rtn", bits=8, group_size=64, symmetric=True)
MIXED = CompressionPlan(quant=ATTENTION_QUANT, module_quant=dict.fromkeys(MLP, MLP_QUANT))


@pytest.fixture(scope="module")
def mixed_export(tiny_model_dir, calibration_windows, tmp_path_factory):
    return compress_and_export(tiny_model_dir, calibration_windows, MIXED, tmp_path_factory.mktemp("mixed") / "out")


def test_each_scheme_is_one_config_group_naming_its_modules(mixed_export):
    result, _, info = mixed_export
    qconfig = json.loads((info.out_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == PACK_QUANTIZED and qconfig["ignore"] == ["lm_head"]
    groups = {tuple(sorted(g["targets"])): g["weights"] for g in qconfig["config_groups"].values()}
    assert set(groups) == {tuple(sorted(ATTENTION)), tuple(sorted(MLP))}
    attention, mlp = groups[tuple(sorted(ATTENTION))], groups[tuple(sorted(MLP))]
    assert (attention["num_bits"], attention["group_size"], attention["symmetric"]) == (4, 32, False)
    assert (mlp["num_bits"], mlp["group_size"], mlp["symmetric"]) == (8, 64, True)

    stored = tensors(info.out_dir / "model.safetensors")
    for name, report in result.modules.items():
        q = report.quantized
        assert (q.bits, q.group_size) == ((8, 64) if name in MLP else (4, 32)), name
        assert torch.equal(unpack(stored[f"{name}.weight_packed"], q.bits, q.codes.shape),
                           q.codes.to(torch.int16) - 2 ** (q.bits - 1)), name
        assert (f"{name}.weight_zero_point" in stored) == (name in ATTENTION), name

    checkpoint = info.checkpoint
    assert checkpoint.mixed and checkpoint.bits is None and checkpoint.quantized_modules == len(result.modules)
    manifest = info.manifest
    assert {name: (m["bits"], m["group_size"]) for name, m in manifest["modules"].items()} == {
        name: ((8, 64) if name in MLP else (4, 32)) for name in result.modules}
    assert manifest["plan"]["module_quant"][MLP[0]]["bits"] == 8
    assert manifest["serving"]["vllm"] == {"serves": True, "scheme": "W4A16 + W8A16 (mixed, one config group per "
                                                                      "scheme)"}


def test_module_bytes_are_the_files_tensors_and_the_formula(mixed_export):
    """The size formula (what a size target plans with) is what the files hold, module by module; the
    files are read here tensor by tensor, independently of module_bytes' header arithmetic."""
    result, _, info = mixed_export
    counted = module_bytes(info.out_dir, result.modules)
    with safe_open(info.out_dir / "model.safetensors", "pt") as f:
        for name, report in result.modules.items():
            in_file = sum(f.get_tensor(key).numel() * f.get_tensor(key).element_size() for key in f.keys()
                          if key.rpartition(".")[0] == name)
            spec = MIXED.quant_for(name)
            predicted = pack_quantized_bytes(*report.shape, spec.bits, spec.group_size, spec.symmetric,
                                             scale_bytes=4)
            assert sum(counted[name].values()) == in_file == sum(predicted.values()), name
            assert counted[name] == predicted, name
    sizes = info.sizes
    assert sum(sizes[f"{part}_bytes"] for part in ("codes", "scales", "zero_points", "other")) == sum(
        sum(parts.values()) for parts in counted.values())
    # 8-bit mlp codes are a quarter of fp32, 4-bit attention an eighth.
    assert sizes["codes_bytes"] == sum(report.shape[0] * report.shape[1] * (1 if name in MLP else 0.5)
                                       for name, report in result.modules.items())


def test_the_model_cards_recipe_loads_it(mixed_export, calibration_windows, monkeypatch):
    result, reference, info = mixed_export
    card = (info.out_dir / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    recipe = next(block for block in blocks if "config_groups" in block)
    assert 'path = "."' in recipe and "- weights: 4-bit integers, asymmetric, groups of 32" in card
    assert "- weights: 8-bit integers, symmetric, groups of 64" in card
    monkeypatch.chdir(info.out_dir)  # the recipe as printed: path = "."
    scope: dict = {}
    exec(compile(recipe, "README.md", "exec"), scope)  # noqa: S102
    windows = calibration_windows[:VERIFY_WINDOWS]
    torch.testing.assert_close(logits_of(scope["model"], windows), reference, atol=ATOL, rtol=RTOL)
    assert verify_export(info.out_dir, reference, windows).max_abs_diff <= ATOL


def test_transformers_dequantize_is_not_the_way_for_mixed_checkpoints(mixed_export):
    """What the card and the notes say: transformers 5.25 dequantizes every layer with one group's scheme
    and fails here. When a release changes this, this test says the docs must."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, _, info = mixed_export
    assert any("mixed precision: transformers' CompressedTensorsConfig(dequantize=True)" in note
               for note in info.notes)
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(info.out_dir, quantization_config=CompressedTensorsConfig(dequantize=True))


def test_verify_fails_on_a_corrupted_scale_of_the_second_scheme(tiny_model_dir, calibration_windows, tmp_path):
    _, reference, info = compress_and_export(tiny_model_dir, calibration_windows, MIXED, tmp_path / "out")
    path = info.out_dir / "model.safetensors"
    stored = tensors(path)
    key = f"{MLP[-1]}.weight_scale"
    stored[key] = stored[key].clone()
    stored[key][0, 0] *= 1.5  # one group of 64 weights in one row of one layer
    save_file(stored, path, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="does not reproduce the compressed model"):
        verify_export(info.out_dir, reference, calibration_windows[:VERIFY_WINDOWS])


def checkpoint_of(*schemes: StoredScheme) -> CheckpointInfo:
    return CheckpointInfo(format=PACK_QUANTIZED, bits=None, group_size=None, symmetric=None,
                          quantized_modules=sum(len(s.modules) for s in schemes), schemes=schemes)


def scheme(bits: int, modules) -> StoredScheme:
    return StoredScheme(bits=bits, group_size=64, symmetric=True, act_order=False, modules=tuple(modules))


def test_vllm_is_claimed_only_for_4_and_8_bits_with_fused_sets_whole():
    """vLLM fuses q/k/v (and gate/up) into one layer: they need one scheme."""
    qkv0 = [name for name in ATTENTION if name.startswith("model.layers.0.") and not name.endswith("o_proj")]
    rest = [name for name in ATTENTION + MLP if name not in qkv0]
    engines, _ = serving(checkpoint_of(scheme(4, rest), scheme(8, qkv0)), MIXED, None)
    assert engines["vllm"] == {"serves": True, "scheme": "W4A16 + W8A16 (mixed, one config group per scheme)"}

    split = [name for name in ATTENTION + MLP if not name.endswith("q_proj")]
    engines, _ = serving(checkpoint_of(scheme(4, split), scheme(8, [n for n in ATTENTION if n.endswith("q_proj")])),
                         MIXED, None)
    assert engines["vllm"]["serves"] is False
    assert engines["vllm"]["reason"].endswith("fused set; model.layers.0.self_attn.q_proj, "
                                              "model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj differ")

    engines, notes = serving(checkpoint_of(scheme(4, ATTENTION), scheme(3, MLP)), MIXED, None)
    assert engines["vllm"]["serves"] is False and engines["vllm"]["reason"].endswith("this checkpoint is 3/4-bit")
    assert any(note.startswith("3-bit weights: load with transformers") for note in notes)
