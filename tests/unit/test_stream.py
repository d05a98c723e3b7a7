"""Streaming (worker.stream): a run that reads the checkpoint one decoder layer at a time computes the same
bytes as a run on the model loaded whole (perplexities, reports, every artifact file), never holds more
than one decoder layer, resumes from layer checkpoints, verifies its export layer by layer, and reads
half-precision checkpoints in their own dtype."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.fixtures_models import SAMPLE_DOCS, build_tiny_model
from tests.interrupts import Stop, stop_after
from tests.same_run import same_files
from tests.specs import MIXED_ADAPTER_BITS, compensation, quant, sparsity
from worker.evaluate import perplexity
from worker.export import ExportError, export_model, reference_logits, verify_export, verify_export_streamed
from worker.export.streamed import layer_logits
from worker.memory import trim_heap
from worker.models import load_model
from worker.plan import CompressionPlan
from worker.resume import LayerCheckpoints
from worker.sequential import compress_model
from worker.stream import LayerStore, StreamedLayers

CPU = torch.device("cpu")
GPTQ3 = quant(method="gptq", bits=3, group_size=32)
PLANS = {  # as tests/unit/test_resume.py
    "gptq3 + eora r8, 4-bit adapters": CompressionPlan(
        quant=GPTQ3, compensation=compensation(rank=8, adapter_bits=4, adapter_group_size=32)),
    "gptq3 + eora r8, fp16/4/8-bit adapters per module (a size target's)": CompressionPlan(
        quant=GPTQ3, compensation=compensation(rank=8, adapter_bits=4, adapter_group_size=32),
        module_adapter_bits=MIXED_ADAPTER_BITS),
    "2:4 sparsegpt + gptq4": CompressionPlan(quant=quant(method="gptq", bits=4, group_size=32),
                                             sparsity=sparsity(method="sparsegpt", n=2, m=4)),
    "gptq3 + eora budget (two walks)": CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=5000)),
    "rtn4 + svd r512 (capped, with notes)": CompressionPlan(quant=quant(method="rtn", bits=4, group_size=32),
                                                            compensation=compensation(method="svd", rank=512)),
    "2:4 magnitude, dense export": CompressionPlan(sparsity=sparsity(method="magnitude", n=2, m=4)),
    "rtn4 + eora r4, refine 2": CompressionPlan(quant=quant(method="rtn", bits=4, group_size=32),
                                                compensation=compensation(rank=4, refine=2)),
    "mixed precision gptq4 g32 + rtn8 g64 mlp, eora r4": CompressionPlan(
        quant=quant(method="gptq", bits=4, group_size=32), compensation=compensation(rank=4),
        module_quant={f"model.layers.{i}.mlp.{p}": quant(method="rtn", bits=8, group_size=64, symmetric=True)
                      for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}),
}
EXTRA = {"job": {}, "model": {"id": "tiny", "revision": None, "source": "local"}, "calibration": {},
         "evaluation": {}}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """family -> a saved tiny model folder."""
    root = tmp_path_factory.mktemp("stream-models")
    folders = {}
    for family in ("llama_tied", "llama", "mistral", "gemma3"):
        folder = root / family
        build_tiny_model(family, len(tiny_tokenizer)).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.mark.parametrize("family", ["llama_tied", "llama", "mistral", "gemma3"])
def test_streamed_perplexity_is_the_whole_models(family, model_dirs, calibration_windows, tmp_path):
    model, _ = load_model(model_dirs[family])
    source = StreamedLayers(model_dirs[family], tmp_path / "store", torch.float32)
    assert perplexity(source, calibration_windows, CPU) == perplexity(model, calibration_windows, CPU)
    assert source.peak_held == 1 and source.held == 0
    assert all(p.device.type == "meta" for p in source.model.parameters())  # nothing left materialised


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_a_streamed_run_makes_the_same_artifact(plan_name, model_dirs, tiny_tokenizer, calibration_windows, tmp_path):
    plan = PLANS[plan_name]
    folder = model_dirs["llama_tied"]
    model, _ = load_model(folder)
    source = StreamedLayers(folder, tmp_path / "store", torch.float32)
    held = []
    reference = compress_model(model, calibration_windows, plan, CPU, batch_size=3)
    result = compress_model(source, calibration_windows, plan, CPU, batch_size=3,
                            on_layer=lambda report: held.append(source.held))
    assert held and set(held) == {0} and source.peak_held == 1
    assert [(m.name, m.error_before, m.error_after, m.rank) for m in result.modules.values()] == [
        (m.name, m.error_before, m.error_after, m.rank) for m in reference.modules.values()]
    assert result.notes == reference.notes
    assert perplexity(source, calibration_windows, CPU) == perplexity(model, calibration_windows, CPU)

    windows = calibration_windows[:2]
    expected_logits = reference_logits(model, windows)
    logits = layer_logits(source, windows, CPU)
    assert torch.allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    export_model(model, tiny_tokenizer, reference, plan, tmp_path / "whole", EXTRA)
    export_model(source, tiny_tokenizer, result, plan, tmp_path / "streamed", EXTRA)
    same_files(tmp_path / "whole", tmp_path / "streamed")
    assert source.peak_held == 1
    if plan.compensates:  # PEFT writes a set's order, which changes with the process's string hashing
        targets = json.loads((tmp_path / "streamed" / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert targets == sorted(targets)
    verified = verify_export_streamed(tmp_path / "streamed", logits, windows, tmp_path / "scratch", CPU)
    assert verified.max_abs_diff <= 1e-4 and verified.adapter == plan.compensates
    assert verify_export(tmp_path / "streamed", logits, windows).max_abs_diff <= 1e-4  # the card's way too


def test_the_streamed_check_fails_on_a_wrong_scale(model_dirs, tiny_tokenizer, calibration_windows, tmp_path):
    from safetensors.torch import load_file, save_file

    plan = PLANS["2:4 sparsegpt + gptq4"]
    source = StreamedLayers(model_dirs["llama"], tmp_path / "store", torch.float32)
    result = compress_model(source, calibration_windows, plan, CPU)
    windows = calibration_windows[:2]
    logits = layer_logits(source, windows, CPU)
    out = tmp_path / "out"
    export_model(source, tiny_tokenizer, result, plan, out, EXTRA)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_scale"][3, 0] *= 1.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="does not reproduce the compressed model"):
        verify_export_streamed(out, logits, windows, tmp_path / "scratch", CPU)


@pytest.mark.parametrize("plan_name", ["gptq3 + eora r8, 4-bit adapters", "gptq3 + eora budget (two walks)"])
def test_a_streamed_run_resumes_where_it_stopped(plan_name, model_dirs, tiny_tokenizer, calibration_windows,
                                                 tmp_path):
    plan = PLANS[plan_name]
    folder = model_dirs["llama_tied"]
    model, _ = load_model(folder)
    reference = compress_model(model, calibration_windows, plan, CPU, batch_size=3)
    export_model(model, tiny_tokenizer, reference, plan, tmp_path / "whole", EXTRA)
    layers = len(reference.modules) // 7
    stopped_after = layers + 1 if plan.uses_budget else 1
    first = LayerCheckpoints(tmp_path / "job", attempt=1, key="k")
    first.take_over()
    with pytest.raises(Stop):
        compress_model(StreamedLayers(folder, tmp_path / "store1", torch.float32), calibration_windows, plan, CPU,
                       batch_size=3, checkpoints=first, on_layer=stop_after(stopped_after))
    second = LayerCheckpoints(tmp_path / "job", attempt=2, key="k")
    resume = second.take_over()
    source = StreamedLayers(folder, tmp_path / "store2", torch.float32)
    result = compress_model(source, calibration_windows, plan, CPU, batch_size=3, checkpoints=second, resume=resume)
    assert source.peak_held == 1
    export_model(source, tiny_tokenizer, result, plan, tmp_path / "streamed", EXTRA)
    same_files(tmp_path / "whole", tmp_path / "streamed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_is_read_in_its_dtype(dtype, tiny_tokenizer, calibration_windows, tmp_path):
    build_tiny_model("llama", len(tiny_tokenizer)).to(dtype).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    own = StreamedLayers(tmp_path / "m", tmp_path / "a")
    assert own.dtype == dtype
    with own.layer(0) as layer:
        assert {p.dtype for p in layer.parameters()} == {dtype}
    fp32 = StreamedLayers(tmp_path / "m", tmp_path / "b", torch.float32)
    with fp32.layer(1) as layer:
        weight = layer.mlp.down_proj.weight.detach().clone()
    model, _ = load_model(tmp_path / "m", "auto")
    assert model.dtype == dtype and torch.equal(weight, model.model.layers[1].mlp.down_proj.weight.float())
    plan = PLANS["2:4 sparsegpt + gptq4"]
    result = compress_model(own, calibration_windows, plan, CPU)
    reference = compress_model(model, calibration_windows, plan, CPU)
    assert [m.error_before for m in result.modules.values()] == [m.error_before for m in reference.modules.values()]


@pytest.mark.parametrize("streamed", [True, False])
def test_a_job_streamed_or_not_publishes_the_same_files(streamed, tiny_model_dir, tmp_path_factory, monkeypatch,
                                                        capsys):
    """`squeeze compress` (run_pipeline) with streaming on and off: the same perplexities and files."""
    from app.cli import main

    root = tmp_path_factory.getbasetemp() / "pipeline-stream"
    root.mkdir(exist_ok=True)
    calibration = root / "cal.txt"
    calibration.write_text("\n\n".join(SAMPLE_DOCS * 3))
    monkeypatch.setenv("SQUEEZE_STREAM_LAYERS", str(streamed).lower())
    monkeypatch.setenv("SQUEEZE_DATA_DIR", str(root / f"data-{streamed}"))
    out = root / f"out-{streamed}"
    code = main(["compress", str(tiny_model_dir), "--out", str(out), "--quant-method", "gptq", "--bits", "4",
                 "--group-size", "32", "--compensation-method", "eora", "--rank", "8", "--calibration", str(calibration),
                 "--num-samples", "8", "--seq-len", "32", "--eval-windows", "4"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["memory"]["streamed"] is streamed
    predicted = metrics["memory"]["predicted"]  # the prediction is kept next to the measured peak
    assert predicted["host_bytes"] == sum(predicted["host_parts"].values()) > 0 and predicted["device_parts"] == {}
    assert ("model (fp32)" in predicted["host_parts"]) is not streamed
    assert metrics["memory"]["peak_rss_over_predicted_host"] == round(metrics["memory"]["peak_rss_bytes"]
                                                                      / predicted["host_bytes"], 3)
    (root / f"metrics-{streamed}.json").write_text(json.dumps(metrics))
    assert not list((root / f"data-{streamed}" / "work").glob("*"))  # no work folder or layer store left
    other = root / f"metrics-{not streamed}.json"
    if other.exists():  # the second of the two runs compares
        before = json.loads(other.read_text())
        for key in ("perplexity_before", "perplexity_after"):
            assert metrics[key] == before[key]
        same_files(root / "out-True", root / "out-False")


def _resident_bytes() -> int:
    """RssAnon + RssFile: what a mapping's touched pages add to the peak RSS."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(fields[f].split()[0]) * 1024 for f in ("RssAnon", "RssFile"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_a_stored_layer_kept_in_part_holds_only_that_part_resident(tmp_path):
    # The export keeps each layer's adapter factors to the end while the layer's codes are dropped; a
    # tensor that lives in a mapping of the store's file would keep the whole touched file resident.
    store = LayerStore(tmp_path)
    for index in range(8):
        store.save(index, {"codes": torch.full((2**21,), index, dtype=torch.int32), "adapter": torch.ones(16)},
                   {"q_proj": {"rank": 1}})  # 8 MB of codes per layer
    before = _resident_bytes()
    kept = []
    for index in range(8):
        tensors, records = store.load(index)
        assert records == {"q_proj": {"rank": 1}} and int(tensors["codes"].sum()) == index * 2**21
        kept.append(tensors["adapter"])
        del tensors
    trim_heap()  # as the streamed source does when it releases a layer: freed memory goes back
    grew = _resident_bytes() - before
    assert grew < 16 * 2**20, f"8 layers of 8 MB read, 16 floats of each kept: {grew / 2**20:.1f} MB stayed resident"
