"""Tiny random models of every supported family, and a tokenizer trained on the spot (no Hub).

Import the fixtures from tests/conftest.py. Sizes: 2 decoder layers, hidden 64, FFN 128, 4 heads /
2 KV heads, vocab = the tokenizer's (~300), so a whole compression run takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Small English corpus: enough text for a byte-level BPE and for a few hundred tokens of windows.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
    "Compression of language models trades a little accuracy for a lot of memory and speed. "
    "Quantization maps every weight to one of a few levels; pruning sets many weights to zero. "
    "A low-rank correction can recover part of what was lost, if it is chosen with care. "
    "Calibration text shows which input directions matter for each layer of the network. "
)
SAMPLE_DOCS = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 2, SAMPLE_TEXT.upper() * 2, SAMPLE_TEXT * 2]


def make_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SAMPLE_DOCS, vocab_size=320, min_frequency=2, special_tokens=["<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


def tiny_config(family: str, vocab_size: int):
    import transformers

    heads = dict(head_dim=16)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**TINY_DIMS),
        "mistral": lambda: transformers.MistralConfig(**TINY_DIMS, sliding_window=16),
        "qwen2": lambda: transformers.Qwen2Config(**TINY_DIMS),
        "qwen3": lambda: transformers.Qwen3Config(**TINY_DIMS, **heads),
        "gemma": lambda: transformers.GemmaConfig(**TINY_DIMS, **heads),
        "gemma2": lambda: transformers.Gemma2Config(**TINY_DIMS, **heads, sliding_window=16),
        "gemma3": lambda: transformers.Gemma3TextConfig(**TINY_DIMS, **heads, sliding_window=16),
        # Tied input/output embeddings, as SmolLM2 (the benchmark model).
        "llama_tied": lambda: transformers.LlamaConfig(**TINY_DIMS, tie_word_embeddings=True),
    }
    config = configs[family]()
    config.vocab_size = vocab_size
    return config


def build_tiny_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), dtype=torch.float32)
    # Random init is N(0, 0.02): make the weights larger so layers do real work and compression
    # errors show in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """Tiny models gain nothing from threads, and tests share the 2 cores with other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny LLaMA with tied embeddings (SmolLM2-like): config, safetensors, tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama_tied", len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calibration_windows(tiny_tokenizer) -> torch.Tensor:
    """(8, 32) token windows from the sample corpus, seed 0."""
    from worker.data import make_windows

    return make_windows(tiny_tokenizer, SAMPLE_DOCS, num_samples=8, seq_len=32, seed=0)
