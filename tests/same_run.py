"""Two compression runs compared bit for bit (resumed against undisturbed, streamed against whole, one
placement of the activations against another): in memory, and as published files."""

from __future__ import annotations

import json

import torch

from worker.linear_compress import CompensatedLinear


def assert_same_run(model, result, reference_model, reference):
    """Every tensor of the models and every field of the results equal, bit for bit."""
    state, expected = model.state_dict(), reference_model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert list(result.modules) == list(reference.modules)  # the manifest lists modules in this order
    for name, ref in reference.modules.items():
        got = result.modules[name]
        for field in ("shape", "sparsity", "zero_fraction", "error_before", "error_after", "rank", "adapter_params",
                      "adapter_bytes", "adapter_bits"):
            assert getattr(got, field) == getattr(ref, field), (name, field)
        assert (got.quantized is None) == (ref.quantized is None), name
        if ref.quantized is not None:
            for part in ("codes", "scales", "zeros", "weight"):
                assert torch.equal(getattr(got.quantized, part), getattr(ref.quantized, part)), (name, part)
            assert (got.quantized.group_size, got.quantized.bits) == (ref.quantized.group_size, ref.quantized.bits)
            # the export reads the codes' weight: it must be the model's own (restored) weight
            module = model.get_submodule(name)
            assert got.quantized.weight.data_ptr() == getattr(module, "base", module).weight.data_ptr()
    assert result.notes == reference.notes
    assert result.budget_params == reference.budget_params
    for name, module in reference_model.named_modules():
        if isinstance(module, CompensatedLinear):
            got = model.get_submodule(name)
            assert isinstance(got, CompensatedLinear), name
            assert (got.quantized is None) == (module.quantized is None)
            if module.quantized is not None:
                for got_factor, ref_factor in zip(got.quantized, module.quantized, strict=True):
                    assert torch.equal(got_factor.codes, ref_factor.codes)
                    assert torch.equal(got_factor.scales, ref_factor.scales)


def same_files(a, b) -> None:
    """Every file of two artifact folders equal byte for byte (squeeze.json: but its creation time; the
    destination's owner file names its job)."""
    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                      and p.name != ".squeeze-owner.json")

    names = files(a)
    assert names == files(b)
    for name in names:
        left, right = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "squeeze.json":
            left, right = ({k: v for k, v in json.loads(x).items() if k != "created_at"} for x in (left, right))
        assert left == right, name
