"""The memory check: its parameter count is the model's, and a job whose minimum cannot fit is refused
before any weight is read, with the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from app.cli import main
from tests.fixtures_models import FAMILIES, build_tiny_model
from worker.memory import GiB, MemoryNeed, _glibc, minimum_need, parameter_counts, refusal, trim_heap


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("llama", "mistral", "qwen2")])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_are_the_models(family, tied, tiny_tokenizer):
    model = build_tiny_model(family, len(tiny_tokenizer))
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    params, layer = parameter_counts(model.config)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))  # qwen2's q/k/v
    assert params + biases == sum(p.numel() for p in model.parameters())
    assert layer + biases // model.config.num_hidden_layers == sum(p.numel() for p in model.model.layers[0].parameters())


def test_the_minimum_counts_the_fp32_model_the_activations_and_one_layer():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    params, layer = parameter_counts(config)
    need = minimum_need(config, num_samples=16, seq_len=32, batch_size=8, on_cpu=False)
    assert need.host == {"model (fp32)": 4 * params, "calibration activations (fp32)": 4 * 16 * 32 * 64}
    assert need.device == {"one decoder layer (fp32)": 4 * layer, "one batch of activations (fp32)": 4 * 8 * 32 * 128,
                           "Gram matrices (fp64)": 8 * (64 * 64 + 128 * 128)}
    on_cpu = minimum_need(config, num_samples=16, seq_len=32, batch_size=8, on_cpu=True)
    assert on_cpu.device == {} and on_cpu.host_bytes == need.host_bytes + need.device_bytes


def test_the_minimum_counts_the_activations_where_the_setting_puts_them():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    activations = {"calibration activations (fp32)": 4 * 16 * 32 * 64}

    def need(where: str, on_cpu: bool = False) -> MemoryNeed:
        return minimum_need(config, num_samples=16, seq_len=32, batch_size=8, on_cpu=on_cpu, activations=where)

    host = need("host")
    on_device = need("device")
    assert on_device.host_bytes == host.host_bytes - 4 * 16 * 32 * 64
    assert on_device.device == {**activations, **host.device}
    for where in ("disk", "auto"):  # auto can always spill them to disk
        assert need(where).host_bytes == on_device.host_bytes and need(where).device == host.device
    assert need("device", on_cpu=True) == need("host", on_cpu=True)  # on the CPU the device is the host


def test_refusal_names_what_does_not_fit():
    need = MemoryNeed(host={"model (fp32)": 3 * GiB}, device={"one decoder layer (fp32)": 2 * GiB})
    assert refusal(need, host_free=4 * GiB, device_free=None, device="cpu") is None
    assert "at least 3.00 GiB of host memory (model (fp32) 3.00 GiB)" in refusal(need, 2 * GiB, None, "cpu")
    assert "2.00 GiB on cuda:0" in refusal(need, 4 * GiB, 1 * GiB, "cuda:0")


@pytest.mark.parametrize(("streamed", "dims", "expected"), [
    (False, dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
     r"model \(fp32\) 262\.83 \+"),
    # Streamed, a 70B model needs ~18 GiB: a 405B-sized one (one layer 11.9 GiB in fp32, 54.8 GiB in all) is refused.
    (True, dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
     r"one decoder layer, original and compressed \(fp32\) 23\.75 \+ embeddings \(fp32\) 7\.83 \+"),
])
def test_a_model_too_big_for_this_worker_fails_before_any_weight_is_read(tmp_path, capsys, monkeypatch, streamed,
                                                                         dims, expected):
    """A config over a folder whose weights file is not even a checkpoint: the refusal comes from the
    config alone (reading the weights would fail differently)."""
    monkeypatch.setenv("SQUEEZE_STREAM_LAYERS", str(streamed).lower())
    folder = tmp_path / "llama-config-only"
    folder.mkdir()
    config = LlamaConfig(**dims, num_key_value_heads=8, vocab_size=128256)
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    calibration = tmp_path / "cal.txt"
    calibration.write_text("some text\n\nmore text\n")
    code = main(["compress", str(folder), "--out", str(tmp_path / "out"), "--quant-method", "rtn", "--bits", "4",
                 "--group-size", "128", "--calibration", str(calibration), "--num-samples", "8", "--seq-len", "32"])
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert code != 0
    assert re.search(r"needs at least \d+\.\d\d GiB of host memory \(" + expected, err), err
    assert re.search(r"this worker has \d+\.\d\d GiB available", err), err
    assert not (tmp_path / "out").exists()
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == dims["num_hidden_layers"]


def test_the_streamed_minimum_does_not_grow_with_the_layers():
    def need(layers: int) -> MemoryNeed:
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                             vocab_size=32000)
        return minimum_need(config, num_samples=16, seq_len=128, batch_size=8, on_cpu=True, streamed=True)

    assert need(8).host_bytes == need(32).host_bytes
    assert need(8).host["one decoder layer, original and compressed (fp32)"] == 2 * 4 * parameter_counts(
        LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16))[1]


def _rss_anon() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssAnon:"))


@pytest.mark.skipif(_glibc() is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only")
def test_trim_heap_returns_freed_tensor_memory_that_glibc_keeps():
    # 64 KB tensors are below glibc's mmap threshold, so they come from the heap; a live 2 KB tensor after
    # each keeps the freed ones from merging into the heap's top, which free() alone would give back.
    # That is how a streamed job's freed layer tensors sit in the heap between longer-lived ones.
    blocks, pins = [], []
    for _ in range(1536):  # 96 MB, pages touched
        blocks.append(torch.ones(16384))
        pins.append(torch.ones(512))
    del blocks
    kept = _rss_anon()
    trim_heap()
    released = kept - _rss_anon()
    assert released > 64 * 2**20, f"malloc_trim gave back {released / 2**20:.1f} MB of 96 MB freed"
    del pins
