"""Where the activations between decoder layers live (worker.activations): device, host or disk give the
same numbers bit for bit (compression, resumed and streamed compression, perplexity, a whole job), the disk files
exist while a walk runs and are gone after it, and "auto" picks by the free memory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import SAMPLE_DOCS
from tests.interrupts import Stop, stop_after
from tests.same_run import assert_same_run, same_files
from tests.specs import compensation, quant
from worker.activations import Activations, Placement, choose_placement
from worker.evaluate import iter_logits, perplexity
from worker.memory import GiB
from worker.models import load_model
from worker.plan import CompressionPlan
from worker.resume import LayerCheckpoints
from worker.sequential import compress_model, walk_layers
from worker.stream import StreamedLayers

CPU = torch.device("cpu")
GPTQ3 = quant(method="gptq", bits=3, group_size=32)
PLANS = {
    "gptq3 + eora r8": CompressionPlan(quant=GPTQ3, compensation=compensation(rank=8)),
    "gptq3 + eora budget (two walks)": CompressionPlan(quant=GPTQ3, compensation=compensation(budget_params=5000)),
}


def placements(folder) -> dict[str, Placement]:
    return {where: Placement(where, folder) for where in ("device", "host", "disk")}


def batch_files(folder) -> list:
    return sorted(folder.rglob("batch-*.safetensors")) if folder.exists() else []


def count_files(folder, counts: list[int]):
    """A layer callback noting how many activation files the folder holds after each layer."""
    return lambda report: counts.append(len(batch_files(folder)))


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_the_container_gives_back_what_it_was_given(where, tmp_path):
    batches = [torch.randn(2, 5, 4, dtype=torch.bfloat16), torch.randn(1, 5, 4, dtype=torch.bfloat16)]
    with Activations(Placement(where, tmp_path), CPU) as held:
        for tensor in batches:
            held.append(tensor)
        held[1] = batches[1] * 2
        assert len(held) == 2
        assert torch.equal(held[0], batches[0]) and torch.equal(held[1], batches[1] * 2)
        assert [t.dtype for t in held] == [torch.bfloat16] * 2
        assert len(batch_files(tmp_path)) == (2 if where == "disk" else 0)
        held.write(tmp_path / "inputs.safetensors")  # what a layer checkpoint keeps of them
        written = load_file(tmp_path / "inputs.safetensors")
        assert written.keys() == {"hidden.0", "hidden.1"}
        assert torch.equal(written["hidden.0"], batches[0]) and torch.equal(written["hidden.1"], batches[1] * 2)
        with pytest.raises(ValueError, match="1 batches given for the 2 held"):
            held.overwrite(batches[:1])
    assert batch_files(tmp_path) == [] and len(held) == 0


def test_the_disk_placement_needs_a_folder():
    with pytest.raises(ValueError, match="folder"):
        Placement("disk")


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_every_placement_compresses_to_the_same_bits(plan_name, tiny_llama, calibration_windows, tmp_path):
    plan = PLANS[plan_name]
    reference_model = copy.deepcopy(tiny_llama)
    reference = compress_model(reference_model, calibration_windows, plan, CPU, batch_size=3,
                               activations=Placement("host"))
    for where, placement in placements(tmp_path).items():
        on_disk = []
        model = copy.deepcopy(tiny_llama)
        result = compress_model(model, calibration_windows, plan, CPU, batch_size=3, activations=placement,
                                on_layer=count_files(tmp_path, on_disk))
        assert_same_run(model, result, reference_model, reference)
        # 8 windows in batches of 3: three files while a disk walk runs, none once it ended
        assert set(on_disk) == ({3} if where == "disk" else {0}), where
        assert batch_files(tmp_path) == []


def test_a_run_resumed_with_the_disk_placement_ends_where_an_undisturbed_one_does(tiny_llama, calibration_windows,
                                                                                  tmp_path):
    plan = PLANS["gptq3 + eora budget (two walks)"]
    reference_model = copy.deepcopy(tiny_llama)
    reference = compress_model(reference_model, calibration_windows, plan, CPU, batch_size=3)
    disk = Placement("disk", tmp_path / "scratch")
    layers = len(tiny_llama.model.layers)
    for stopped_after in (1, layers + 1):  # within the first walk, and within the second
        job_dir = tmp_path / f"stop{stopped_after}"
        first = LayerCheckpoints(job_dir, attempt=1, key="k")
        first.take_over()
        with pytest.raises(Stop):
            compress_model(copy.deepcopy(tiny_llama), calibration_windows, plan, CPU, batch_size=3,
                           checkpoints=first, on_layer=stop_after(stopped_after), activations=disk)
        assert batch_files(disk.folder) == []  # a failed walk removes its files too
        second = LayerCheckpoints(job_dir, attempt=2, key="k")
        resume = second.take_over()
        assert resume is not None and resume.inputs is not None
        model = copy.deepcopy(tiny_llama)
        result = compress_model(model, calibration_windows, plan, CPU, batch_size=3, checkpoints=second,
                                resume=resume, activations=disk)
        assert_same_run(model, result, reference_model, reference)
        assert batch_files(disk.folder) == []


@pytest.mark.parametrize("where", ["device", "disk"])
def test_a_streamed_run_with_each_placement_is_the_whole_models(where, tiny_model_dir, calibration_windows, tmp_path):
    """A layer source that streams the checkpoint (worker.stream), its activations on the device or the disk:
    the same reports and perplexities as the whole model with its activations on the host."""
    plan = PLANS["gptq3 + eora budget (two walks)"]
    model, _ = load_model(tiny_model_dir)
    reference = compress_model(model, calibration_windows, plan, CPU, batch_size=3)
    source = StreamedLayers(tiny_model_dir, tmp_path / "store", torch.float32)
    placement = Placement(where, tmp_path / "scratch")
    result = compress_model(source, calibration_windows, plan, CPU, batch_size=3, activations=placement)
    assert [(m.name, m.error_before, m.error_after, m.rank) for m in result.modules.values()] == [
        (m.name, m.error_before, m.error_after, m.rank) for m in reference.modules.values()]
    assert perplexity(source, calibration_windows, CPU, placement=placement) == perplexity(model, calibration_windows,
                                                                                          CPU)
    assert batch_files(tmp_path / "scratch") == []


def test_every_placement_evaluates_to_the_same_perplexity(tiny_llama, calibration_windows, tmp_path):
    expected = perplexity(tiny_llama, calibration_windows, CPU, batch_size=3)
    for where, placement in placements(tmp_path).items():
        assert perplexity(tiny_llama, calibration_windows, CPU, batch_size=3, placement=placement) == expected, where
    logits = iter_logits(tiny_llama, calibration_windows, CPU, batch_size=3, placement=Placement("disk", tmp_path))
    next(logits)
    assert len(batch_files(tmp_path)) == 3  # the final hidden states, read back batch by batch
    logits.close()  # an evaluation stopped early still removes its files
    assert batch_files(tmp_path) == []


@pytest.mark.gpu  # deselected by default; run on a CUDA machine with `pytest -m gpu`
def test_on_cuda_the_device_placement_keeps_them_there_and_computes_the_same_bits(tiny_llama, calibration_windows,
                                                                                   tmp_path):
    cuda = torch.device("cuda")
    for where, device_type in (("device", "cuda"), ("host", "cpu"), ("disk", "cpu")):
        with walk_layers(tiny_llama, calibration_windows, cuda, batch_size=3,
                         placement=Placement(where, tmp_path)) as final:
            assert {final[b].device.type for b in range(len(final))} == {device_type}, where
    plan = PLANS["gptq3 + eora budget (two walks)"]
    reference_model = copy.deepcopy(tiny_llama)
    reference = compress_model(reference_model, calibration_windows, plan, cuda, batch_size=3)
    for where, placement in placements(tmp_path).items():
        model = copy.deepcopy(tiny_llama)
        result = compress_model(model, calibration_windows, plan, cuda, batch_size=3, activations=placement)
        assert_same_run(model, result, reference_model, reference)
        assert perplexity(model, calibration_windows, cuda, placement=placement) == perplexity(
            reference_model, calibration_windows, cuda), where


@pytest.mark.parametrize(("setting", "on_cpu", "device_free", "host_free", "expected"), [
    ("auto", False, 10 * GiB, 100 * GiB, "device"),  # 1 + 2 GiB within 90% of 10
    ("auto", False, 3 * GiB, 100 * GiB, "host"),  # 1 + 2 GiB above 90% of 3
    ("auto", False, None, 100 * GiB, "host"),
    ("auto", True, None, 100 * GiB, "host"),  # on the CPU the device is the host
    ("auto", True, None, 5 * GiB, "disk"),  # 1 + 4 GiB above 80% of 5
    ("auto", False, 3 * GiB, 5 * GiB, "disk"),
    ("auto", True, None, None, "host"),  # unknown host memory: as before this setting
    ("disk", False, 100 * GiB, 100 * GiB, "disk"),
    ("device", False, 0, 100 * GiB, "device"),
])
def test_auto_takes_the_device_then_the_host_then_the_disk(setting, on_cpu, device_free, host_free, expected):
    assert choose_placement(setting, activation_bytes=GiB, device_need=2 * GiB, host_need=4 * GiB, on_cpu=on_cpu,
                            device_free=device_free, host_free=host_free) == expected


@pytest.mark.parametrize("setting", ["disk", "device", "auto"])
def test_a_job_publishes_the_same_files_wherever_its_activations_live(setting, tiny_model_dir, tmp_path_factory,
                                                                      monkeypatch, capsys):
    """`squeeze compress` with each setting against "host": the same perplexities, numbers and files, and the
    placement with the activations' size in the metrics."""
    from app.cli import main

    root = tmp_path_factory.getbasetemp() / "pipeline-activations"
    root.mkdir(exist_ok=True)
    calibration = root / "cal.txt"
    calibration.write_text("\n\n".join(SAMPLE_DOCS * 3))

    def job(where: str) -> dict:
        saved = root / f"metrics-{where}.json"
        if not saved.exists():  # "host" runs once for every setting
            monkeypatch.setenv("SQUEEZE_ACTIVATIONS", where)
            monkeypatch.setenv("SQUEEZE_DATA_DIR", str(root / f"data-{where}"))
            code = main(["compress", str(tiny_model_dir), "--out", str(root / f"out-{where}"), "--quant-method",
                         "gptq", "--bits", "4", "--group-size", "32", "--compensation-method", "eora", "--rank", "8",
                         "--calibration", str(calibration), "--num-samples", "8", "--seq-len", "32",
                         "--eval-windows", "4"])
            assert code == 0
            saved.write_text(json.dumps(json.loads(capsys.readouterr().out)["metrics"]))
            assert not list((root / f"data-{where}" / "work").glob("*"))  # no work folder or activation file left
        return json.loads(saved.read_text())

    host, metrics = job("host"), job(setting)
    assert metrics["memory"]["activations"] == ("host" if setting == "auto" else setting)  # auto on the CPU
    assert metrics["memory"]["activations_bytes"] == 8 * 32 * 64 * 4  # (windows, seq_len, hidden) in fp32
    assert host["memory"]["activations"] == "host"
    for key in ("perplexity_before", "perplexity_after"):
        assert metrics[key] == host[key], key
    seconds = "seconds"
    assert ({k: v for k, v in metrics["compression"].items() if k != seconds}
            == {k: v for k, v in host["compression"].items() if k != seconds})
    same_files(root / "out-host", root / f"out-{setting}")


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def event(self, stage, message, level="info", data=None) -> None:
        self.events.append((stage, message, data))


@pytest.mark.parametrize(("setting", "host_free", "expected"), [
    ("disk", 100 * GiB, "disk"), ("device", 100 * GiB, "device"), ("auto", 100 * GiB, "host"), ("auto", 0, "disk")])
def test_the_job_says_where_its_activations_live_and_their_size(setting, host_free, expected, tiny_llama,
                                                                 calibration_windows, tmp_path, monkeypatch):
    """Decided once for the larger of the calibration and evaluation sets, said in an event."""
    import worker.activations
    from app.settings import Settings
    from worker.pipeline import _place_activations

    monkeypatch.setattr(worker.activations, "host_available", lambda: host_free)
    evaluation = calibration_windows.repeat(2, 1)  # (16, 32): larger than the calibration's (8, 32)
    reporter = Events()
    placement, size = _place_activations(Settings(data_dir=tmp_path, activations=setting), tiny_llama,
                                         calibration_windows, evaluation, CPU, tmp_path / "scratch", reporter)
    assert placement == Placement(expected, tmp_path / "scratch" / "activations")
    assert size == 16 * 32 * 64 * 4  # (windows, seq_len, hidden) fp32
    [(stage, message, data)] = reporter.events
    assert data == {"activations": expected, "activations_bytes": size}
    assert f"{size:,} bytes" in message and ("auto: " in message) == (setting == "auto")
