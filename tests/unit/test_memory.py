"""The memory check: its parameter count is the model's, its predicted peak counts the code's big
tensors (hand-computed here for a small config), and a job whose predicted peak cannot fit is refused
before any weight is read, with the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from app.cli import main
from app.jobs.spec import JobSpec
from tests.fixtures_models import FAMILIES, build_tiny_model
from worker import memory
from worker.memory import (
    BASELINE_BYTES,
    GiB,
    MemoryNeed,
    _glibc,
    job_steps,
    minimum_need,
    parameter_counts,
    predict_peak,
    refusal,
    trim_heap,
)

SMALL = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)


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
    need = MemoryNeed(host={"model (fp32)": 3 * GiB}, device={"one decoder layer (fp32)": 2 * GiB},
                      host_step="compression", device_step="evaluation")
    assert refusal(need, host_free=4 * GiB, device_free=None, device="cpu") is None
    assert ("predicted to need 3.00 GiB of host memory at its peak during compression (model (fp32) 3.00 GiB) "
            "and this worker has 2.00 GiB available") in refusal(need, 2 * GiB, None, "cpu")
    assert "2.00 GiB on cuda:0 at its peak during evaluation" in refusal(need, 4 * GiB, 1 * GiB, "cuda:0")


def job(**fields) -> JobSpec:
    """gptq 4-bit + EoRA rank 8, 16 calibration windows of 16 tokens, 4 evaluation windows."""
    return JobSpec.model_validate({"model": {"id": "m"}, "quantization": {"method": "gptq", "bits": 4},
                                   "compensation": {"method": "eora", "rank": 8},
                                   "calibration": {"dataset": "wikitext", "num_samples": 16, "seq_len": 16},
                                   "evaluation": {"num_windows": 4}, **fields})


def test_the_prediction_counts_the_big_tensors_of_each_step():
    """SMALL: q (64, 64), k and v (32, 64), o (64, 64), gate and up (128, 64), down (64, 128); fp32."""
    layer = 4 * parameter_counts(SMALL)[1]
    steps = job_steps(SMALL, job(), on_cpu=True, streamed=True, dtype_bytes=4, activations="host", batch_size=8)
    grams = 8 * (64 * 64 + 64 * 64 + 64 * 64 + 128 * 128)  # q/k/v, o, gate/up, down
    # down_proj: the original, its compressed copy and the fp32 residual, + GPTQ's five fp64 (128, 128)
    # Hessian copies and its fp32 working weight (more than EoRA's decomposition).
    down = 64 * 128 * (4 + 4 + 4) + 5 * 128 * 128 * 8 + 64 * 128 * 4
    assert steps["compression"] == ({
        "interpreter and libraries (measured)": BASELINE_BYTES, "calibration activations (fp32)": 16 * 16 * 64 * 4,
        "one decoder layer (fp32)": layer, "Gram matrices of every input group (fp64)": grams,
        "EoRA eigenspaces of every input group (fp64)": grams,
        "largest Linear 64x128: its copies and compression": down}, {})
    assert steps["evaluation"][0]["one window's logits and log-softmax (fp32)"] == 2 * 16 * 100 * 4
    assert steps["evaluation"][0]["lm_head (fp32)"] == 100 * 64 * 4
    adapters = 2 * 8 * 2 * (64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 64 + 64 + 128)  # fp16 B and A
    assert steps["export"][0]["adapters of every layer (fp16)"] == adapters
    peak = predict_peak(SMALL, job(), on_cpu=True, streamed=True)
    assert peak.host_step == max(steps, key=lambda step: sum(steps[step][0].values()))
    assert peak.host == steps[peak.host_step][0] and peak.device == {}

    whole = job_steps(SMALL, job(), on_cpu=True, streamed=False, dtype_bytes=4, activations="host", batch_size=8)
    assert whole["compression"][0]["model (fp32)"] == 4 * parameter_counts(SMALL)[0]
    assert "one decoder layer (fp32)" not in whole["compression"][0]  # on the CPU it is the model's
    assert whole["loading"][0]["checkpoint read while loading"] == 4 * parameter_counts(SMALL)[0]
    sink = job_steps(SMALL, job(compensation={"method": "eora", "rank": 8, "sink_tokens": 4}), on_cpu=True,
                     streamed=True, dtype_bytes=4, activations="host", batch_size=8)
    assert sink["compression"][0]["the same without sink tokens (fp64)"] == grams


def test_a_target_jobs_prediction_counts_its_candidate_measurement():
    target = job(quantization={"method": "gptq"}, compensation={"method": "eora"}, target={"bits_per_weight": 4.5})
    steps = job_steps(SMALL, target, on_cpu=True, streamed=False, dtype_bytes=4, activations="host", batch_size=8)
    # down_proj: an RTN candidate (its copy and compressed weight), its residual in fp32 and fp64, and EoRA's
    # decomposition: projected error (64, 128), U (64, 64), Vh (64, 128), back-projection (128, 128), fp64.
    candidate = 64 * 128 * (4 + 4 + 4 + 8) + 8 * (64 * 128 + 64 * 64 + 64 * 128 + 128 * 128)
    assert steps["size-target measurement"][0]["candidate measurement of Linear 64x128"] == candidate
    backward = steps["size-target sensitivity"][0]  # the whole model's backward pass, 8 windows of 16 tokens
    assert backward["activations saved for the backward pass (fp32)"] == 2 * 8 * 16 * (7 * 64 + 3 * 32 + 4 * 128) * 4
    assert backward["logits, log-softmax and gradient (fp32)"] == 3 * 8 * 16 * 100 * 4
    streamed = job_steps(SMALL, target, on_cpu=True, streamed=True, dtype_bytes=4, activations="host", batch_size=8)
    assert "size-target measurement" in streamed and "size-target sensitivity" not in streamed  # no backward pass
    assert "size-target measurement" not in job_steps(SMALL, job(), on_cpu=True, streamed=False, dtype_bytes=4,
                                                      activations="host", batch_size=8)


def test_the_streamed_prediction_grows_with_the_layers_only_by_the_adapters():
    def steps(layers: int) -> dict:
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                             vocab_size=32000)
        return job_steps(config, job(), on_cpu=True, streamed=True, dtype_bytes=4, activations="host", batch_size=8)

    few, many = steps(8), steps(32)
    assert few.keys() == many.keys()
    for step in few:
        grows = {"adapters of every layer (fp16)"}
        assert {k: v for k, v in few[step][0].items() if k not in grows} == \
            {k: v for k, v in many[step][0].items() if k not in grows}
    assert many["export"][0]["adapters of every layer (fp16)"] == 4 * few["export"][0]["adapters of every layer (fp16)"]
    assert predict_peak(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32,
                                    num_attention_heads=16, vocab_size=32000), job(), on_cpu=True,
                        streamed=True).host_step == "compression"


def test_the_device_is_the_host_on_the_cpu_and_nothing_is_counted_twice():
    cpu = job_steps(SMALL, job(), on_cpu=True, streamed=True, dtype_bytes=4, activations="device", batch_size=8)
    cuda = job_steps(SMALL, job(), on_cpu=False, streamed=True, dtype_bytes=4, activations="device", batch_size=8)
    for step in cpu:
        host, device = cuda[step]
        read = sum(n for part, n in host.items() if part.endswith(", read on the host"))
        assert sum(cpu[step][0].values()) == sum(host.values()) + sum(device.values()) - read, step
    assert "calibration activations (fp32)" in cuda["compression"][1]  # Settings.activations = "device"
    assert "calibration activations (fp32)" in cpu["compression"][0]  # the CPU's device is the host
    assert cuda["compression"][0]["one decoder layer (fp32), read on the host"] == \
        cuda["compression"][1]["one decoder layer (fp32)"]


def test_the_refusal_lists_the_predicted_parts():
    need = predict_peak(SMALL, job(), on_cpu=True, streamed=True)
    message = refusal(need, host_free=need.host_bytes - 1, device_free=None, device="cpu")
    assert f"during {need.host_step} (" in message
    for part, n in need.host.items():
        assert f"{part} {n / GiB:.2f}" in message
    assert refusal(need, host_free=need.host_bytes, device_free=None, device="cpu") is None


@pytest.mark.parametrize(("streamed", "dims", "expected"), [
    (False, dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
     r"model \(fp32\) 262\.83 \+"),
    # Streamed, a 405B-sized model: one layer is 11.9 GiB in fp32, its Grams 27.1 GiB (down_proj's alone 21.1).
    # The activations count nowhere: Settings.activations is "auto", which may spill them to disk.
    (True, dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
     r"one decoder layer \(fp32\) 11\.88 \+ Gram matrices of every input group \(fp64\) 27\.12 \+"),
])
def test_a_model_too_big_for_this_worker_fails_before_any_weight_is_read(tmp_path, capsys, monkeypatch, streamed,
                                                                         dims, expected):
    """A config over a folder whose weights file is not even a checkpoint: the refusal comes from the
    config alone (reading the weights would fail differently). The worker has 16 GiB, whatever the host."""
    monkeypatch.setenv("SQUEEZE_STREAM_LAYERS", str(streamed).lower())
    monkeypatch.setattr(memory, "host_available", lambda: 16 * GiB)
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
    assert re.search(r"predicted to need \d+\.\d\d GiB of host memory at its peak during [a-z -]+ \(interpreter "
                     r"and libraries \(measured\) 0\.48 \+ " + expected, err), err
    assert "this worker has 16.00 GiB available" in err, err
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
