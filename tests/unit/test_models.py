"""Architecture registry and safetensors-only loading, on tiny random models of every family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.fixtures_models import FAMILIES, build_tiny_model
from worker.models import (
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    UnsupportedArchitecture,
    decoder_linears,
    get_architecture,
    load_model,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_finds_layers_and_linears(family, tiny_tokenizer):
    model = build_tiny_model(family, len(tiny_tokenizer))
    arch = get_architecture(model)
    assert arch.family == family
    assert len(arch.decoder_layers(model)) == 2
    linears = decoder_linears(model, arch)
    assert len(linears) == 2 * 7
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert linears["model.layers.1.mlp.down_proj"].weight.shape == (64, 128)
    assert arch.module(model, "embed_tokens") is model.get_input_embeddings()
    assert arch.module(model, "lm_head") is model.get_output_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_groups_read_the_same_input(family, tiny_tokenizer, calibration_windows):
    """One Gram per group is only right if every Linear of a group sees the very same input."""
    model = build_tiny_model(family, len(tiny_tokenizer))
    arch = get_architecture(model)
    layer = arch.decoder_layers(model)[1]
    seen = {}
    handles = [
        layer.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        for name in arch.linear_names
    ]
    with torch.no_grad():
        model(calibration_windows[:2])
    for handle in handles:
        handle.remove()
    for group in arch.linear_groups:
        for name in group[1:]:
            torch.testing.assert_close(seen[name], seen[group[0]], rtol=0, atol=0)
    assert not torch.equal(seen["self_attn.o_proj"], seen["self_attn.q_proj"])  # different groups differ


def test_unsupported_architecture_lists_supported_types():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedArchitecture) as info:
        get_architecture(model)
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
        assert model_type in message
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}
    assert isinstance(info.value, ValueError)


def test_load_model_tied_embeddings(tiny_model_dir, calibration_windows):
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == "<eos>"
    reloaded, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(calibration_windows).logits, reloaded(calibration_windows).logits)


def test_load_model_bf16(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_load_model_refuses_pickle_only_folder(tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(tmp_path)


def test_load_model_refuses_unsupported_type_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    save_file({"not_a_weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedArchitecture, match="supported model types: llama"):
        load_model(tmp_path)


def test_load_model_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
