"""What the artifact's files hold for the decoder Linears, counted tensor by tensor from the
safetensors headers (DESIGN: sizes are counted from the files), by part: codes (packed integers, or
the dense weight of an unquantized Linear), scales, zero points, other per-module metadata (e.g.
compressed-tensors' weight_shape), and the adapter as stored and as an engine serves it (fp16)."""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any

from worker.export.adapter import AdapterInfo
from worker.plan import CompressionResult

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
PART_OF = {"weight_packed": "codes", "weight": "codes", "weight_scale": "scales", "weight_zero_point": "zero_points"}


PACK_WORD_BITS = 32  # pack-quantized packs integers densely into int32 words, row by row
SHAPE_BYTES = 2 * 8  # weight_shape: the unpacked (d_out, d_in) as int64


def pack_quantized_bytes(d_out: int, d_in: int, bits: int, group_size: int, symmetric: bool,
                         scale_bytes: int) -> dict[str, int]:
    """Bytes by part that compressed-tensors' pack-quantized format stores for one Linear (d_out, d_in):
    codes (d_out, ceil(d_in * bits / 32)) int32; scales (d_out, groups) in the model dtype; zero points,
    asymmetric only, packed along d_out: (ceil(d_out * bits / 32), groups) int32; weight_shape int64 (2,).
    group_size: -1 = per channel. The one formula for a size before the files exist (the size target's
    candidates); the export's own accounting (module_bytes) reads the files, and the tests hold the two equal."""
    groups = 1 if group_size == -1 else d_in // group_size
    word = PACK_WORD_BITS // 8
    return {"codes": d_out * _ceil_div(d_in * bits, PACK_WORD_BITS) * word,
            "scales": d_out * groups * scale_bytes,
            "zero_points": 0 if symmetric else _ceil_div(d_out * bits, PACK_WORD_BITS) * groups * word,
            "other": SHAPE_BYTES}


def module_bytes(out_dir: Path, modules) -> dict[str, dict[str, int]]:
    """{module: {part: bytes}} of the named Linears, from the safetensors headers under out_dir."""
    from safetensors import safe_open

    counted = {name: {"codes": 0, "scales": 0, "zero_points": 0, "other": 0} for name in modules}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, _, tensor = key.rpartition(".")
                if module not in counted:
                    continue
                view = f.get_slice(key)
                counted[module][PART_OF.get(tensor, "other")] += prod(view.get_shape()) * DTYPE_BYTES[view.get_dtype()]
    return counted


def linear_sizes(out_dir: Path, result: CompressionResult, adapter: AdapterInfo | None) -> dict[str, Any]:
    """Bytes by part and bits per weight (stored; served = with the adapter at fp16) over the decoder
    Linears the run compressed. A Linear bias, if any, counts as "other"."""
    weights = sum(d_out * d_in for d_out, d_in in (m.shape for m in result.modules.values()))
    parts = {"codes": 0, "scales": 0, "zero_points": 0, "other": 0}
    for counted in module_bytes(out_dir, result.modules).values():
        for part, n in counted.items():
            parts[part] += n
    stored_adapter = 0 if adapter is None else adapter.stored_bytes
    served_adapter = 0 if adapter is None else adapter.served_bytes
    linear_bytes = sum(parts.values())
    return {"linear_weights": weights, **{f"{part}_bytes": n for part, n in parts.items()},
            "adapter_stored_bytes": stored_adapter, "adapter_served_bytes": served_adapter,
            "bits_per_weight_stored": 8 * (linear_bytes + stored_adapter) / weights if weights else None,
            "bits_per_weight_served": 8 * (linear_bytes + served_adapter) / weights if weights else None}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
