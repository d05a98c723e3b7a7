"""Files the end-to-end jobs use: a saved tiny model, a larger one to cancel mid-way, calibration text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_models import SAMPLE_DOCS


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="session")
def calibration_txt(tmp_path_factory) -> Path:
    """The sample corpus as a .txt file, one document per blank-line separated paragraph."""
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text("\n\n".join(SAMPLE_DOCS * 3) + "\n")
    return path


@pytest.fixture(scope="session")
def slow_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A LLaMA with enough layers and width that a job takes seconds: room to cancel it mid-way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tiny_tokenizer))
    folder = tmp_path_factory.mktemp("slow-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
