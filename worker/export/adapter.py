'''The compensation as a PEFT LoRA adapter, written without building a PeftModel.

PEFT computes W x + scaling * B (A x) with scaling = lora_alpha / r. Squeeze's compensated Linear
computes W x + B (A x), so every module gets alpha = its own rank (scaling exactly 1). Ranks may
differ per module (rank budgets): `r`/`lora_alpha` hold the most common rank and `rank_pattern` /
`alpha_pattern` list every other module by its FULL dotted path. PEFT matches pattern keys against
the end of module names, so a short key like "q_proj" would hit every layer; a full path hits one.
vLLM reads each module's rank from the tensor shapes and applies one scaling lora_alpha / r; with
alpha = r everywhere that scaling is 1 for every module too.

Modules whose allocated rank is 0 carry no adapter and are not targeted.
What is stored is what the job evaluated (CompensatedLinear holds the same fp16 values):
- every adapter fp16: adapter_model.safetensors, PEFT's own file, fp16 factors.
- any adapter quantized (adapter_bits, or a size target's per-module choice): one file,
  adapter_quantized.safetensors, instead; PEFT has no quantized-LoRA layout. Per quantized factor
  `<PEFT key>.codes` and `.zeros` (uint8, unsigned integers of its bits packed densely, low bits
  first, in row-major order) and `.scales` (fp16, (rows, groups)); the factors of modules kept in
  fp16 as PEFT stores them, `<PEFT key>.weight` (fp16), in the same file, so no PEFT file ever
  holds only some of the modules its config targets. The metadata entry "squeeze" holds
  {"factors": {<PEFT key>: [rows, dim, group_size, bits]}} for the quantized factors (files written
  before per-module precisions list [rows, dim, group_size] and one "bits" for all; the recipe reads
  both). DEQUANTIZE_RECIPE (printed in the model card, run as is by the export check) turns the file
  into adapter_model.safetensors.
The tensor bytes of each module's factors in the file are exactly linear_compress.adapter_size's count
for its precision (checked on export, module by module).
'''

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from worker.compression.adapters import FACTOR_DTYPE, LowRankAdapter
from worker.engines import VLLM_LORA_RANKS
from worker.linear_compress import adapter_served_bytes

ADAPTER_DIR = "adapter"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QUANTIZED_NAME = "adapter_quantized.safetensors"
QUANTIZED_METADATA_KEY = "squeeze"
PEFT_PREFIX = "base_model.model."  # a PeftModel's prefix of the base model's module paths, in PEFT's saved keys
# The base model sits one folder up; PEFT records it, PeftModel.from_pretrained does not need it.
BASE_MODEL_PATH = ".."

# Turns adapter_quantized.safetensors in `folder` into PEFT's adapter_model.safetensors (fp16), with
# only torch and safetensors. Same arithmetic as QuantizedFactor.dequantize: fp32 product, one rounding.
DEQUANTIZE_RECIPE = '''\
import json, torch
from safetensors import safe_open
from safetensors.torch import save_file

def unpack(packed, bits, count):  # uint8 bytes -> `count` integers of `bits` bits, low bits first
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten()[:count]

with safe_open(f"{folder}/adapter_quantized.safetensors", "pt") as f:
    meta = json.loads(f.metadata()["squeeze"])
    factors = {key: f.get_tensor(key) for key in f.keys() if key.endswith(".weight")}  # fp16 factors as stored
    for key, (rows, dim, group, *width) in meta["factors"].items():
        bits = width[0] if width else meta["bits"]  # older files: one width for every factor
        codes = unpack(f.get_tensor(key + ".codes"), bits, rows * dim).float()
        zeros = unpack(f.get_tensor(key + ".zeros"), bits, rows * dim // group).float()
        scales = f.get_tensor(key + ".scales").float().reshape(-1, 1)
        values = (codes.reshape(-1, group) - zeros.reshape(-1, 1)) * scales
        factors[key + ".weight"] = values.reshape(rows, dim).to(torch.float16)
save_file(factors, f"{folder}/adapter_model.safetensors", metadata={"format": "pt"})
'''


@dataclass(frozen=True)
class AdapterInfo:
    path: str  # relative to the export folder
    r: int  # the config's default rank (the most common one)
    max_rank: int
    ranks: dict[str, int] = field(repr=False)  # full module name -> rank, adapted modules only
    params: int
    file: str  # the weights file inside path: adapter_model.safetensors, or adapter_quantized.safetensors
    stored_dtype: str  # "float16", or "int4"/"int8" codes with fp16 group scales (and fp16 factors, mixed)
    stored_bytes: int  # tensor bytes in that file, counted tensor by tensor
    module_bytes: dict[str, int] = field(repr=False)  # full module name -> its factors' tensor bytes in that file
    served_bytes: int  # what an engine holds: fp16, 2 bytes per parameter

    @property
    def quantized(self) -> bool:
        return self.file == QUANTIZED_NAME

    def sizes(self) -> dict:
        """Stored and served bytes, and bits per adapter parameter, for the manifest and job metrics."""
        return {"params": self.params, "file": f"{self.path}/{self.file}", "stored_dtype": self.stored_dtype,
                "stored_bytes": self.stored_bytes, "served_bytes": self.served_bytes,
                "stored_bits_per_param": 8 * self.stored_bytes / self.params,
                "served_bits_per_param": 8 * self.served_bytes / self.params}


def save_adapter(adapters: dict[str, LowRankAdapter], out_dir: Path) -> AdapterInfo:
    """adapters: {full Linear name: its stored adapter}, as unwrap_adapters returns them."""
    from peft import LoraConfig

    adapters = {name: adapter for name, adapter in adapters.items() if adapter.rank > 0}
    if not adapters:
        raise ValueError("no module has a rank > 0: there is no adapter to save")
    ranks = {name: adapter.rank for name, adapter in adapters.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: rank for name, rank in ranks.items() if rank != default_rank}
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_rank,
        target_modules=sorted(ranks),
        rank_pattern=others,
        alpha_pattern=dict(others),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_MODEL_PATH,
        inference_mode=True,
    )
    folder = out_dir / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    # PEFT writes target_modules in the order of a Python set (it differs from process to process with
    # string hashing); sorted, the same job writes the same bytes. Same JSON layout as PEFT's.
    written = json.loads((folder / CONFIG_NAME).read_text())
    written["target_modules"] = sorted(written["target_modules"])
    (folder / CONFIG_NAME).write_text(json.dumps(written, indent=2, sort_keys=True))
    if any(adapter.quantized is not None for adapter in adapters.values()):
        file, stored_dtype = QUANTIZED_NAME, _save_quantized(adapters, folder / QUANTIZED_NAME)
    else:
        file, stored_dtype = WEIGHTS_NAME, _save_fp16(adapters, folder / WEIGHTS_NAME)
    params = sum(adapter.lora_b.numel() + adapter.lora_a.numel() for adapter in adapters.values())
    counted = module_tensor_bytes(folder / file)
    return AdapterInfo(path=ADAPTER_DIR, r=default_rank, max_rank=max(ranks.values()), ranks=ranks, params=params,
                       file=file, stored_dtype=stored_dtype, stored_bytes=sum(counted.values()), module_bytes=counted,
                       served_bytes=adapter_served_bytes(params))


def peft_key(name: str, factor: str) -> str:
    """PEFT's saved key of one factor ("A" or "B"): the PeftModel prefix, the module path, no adapter name."""
    return f"{PEFT_PREFIX}{name}.lora_{factor}"


def _fp16_tensors(name: str, adapter: LowRankAdapter) -> dict[str, Tensor]:
    """One module's factors as PEFT stores them (fp16, keys `<PEFT key>.weight`)."""
    tensors = {f"{peft_key(name, 'A')}.weight": _cpu(adapter.lora_a),
               f"{peft_key(name, 'B')}.weight": _cpu(adapter.lora_b)}
    if any(t.dtype != FACTOR_DTYPE for t in tensors.values()):
        raise ValueError(f"adapter factors must be {FACTOR_DTYPE}, their stored form")
    return tensors


def _save_fp16(adapters: dict[str, LowRankAdapter], path: Path) -> str:
    from safetensors.torch import save_file

    tensors = {}
    for name, adapter in adapters.items():
        tensors |= _fp16_tensors(name, adapter)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(FACTOR_DTYPE).removeprefix("torch.")


def _save_quantized(adapters: dict[str, LowRankAdapter], path: Path) -> str:
    """The quantized form of the module doc: quantized factors as codes, fp16 ones as PEFT stores them."""
    from safetensors.torch import save_file

    tensors, factors, widths, fp16 = {}, {}, set(), 0
    for name, adapter in adapters.items():
        if adapter.quantized is None:
            tensors |= _fp16_tensors(name, adapter)
            fp16 += 1
            continue
        quantized_b, quantized_a = adapter.quantized
        for factor, q in (("A", quantized_a), ("B", quantized_b)):
            key = peft_key(name, factor)
            rows, dim = q.codes.shape
            tensors[f"{key}.codes"] = pack_bits(q.codes, q.bits)
            tensors[f"{key}.zeros"] = pack_bits(q.zeros, q.bits)
            tensors[f"{key}.scales"] = _cpu(q.scales.to(FACTOR_DTYPE))
            factors[key] = [rows, dim, q.group_size, q.bits]
            widths.add(q.bits)
    # One metadata entry only: safetensors writes a header's metadata in hash-map order, which differs from
    # process to process once there are two keys, and the same job must write the same bytes.
    save_file(tensors, path, metadata={QUANTIZED_METADATA_KEY: json.dumps({"factors": factors})})
    stored = f"{' and '.join(f'int{w}' for w in sorted(widths))} codes and zero points, float16 group scales"
    return stored + (f"; float16 factors for {fp16} of {len(adapters)} modules" if fp16 else "")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Unsigned integers (any shape, each < 2^bits) -> uint8 (ceil(numel * bits / 8),), densely packed
    in row-major order, low bits first. bits divides 8."""
    if 8 % bits:
        raise ValueError(f"packing takes 1, 2, 4 or 8 bits, got {bits}")
    flat = values.detach().cpu().flatten().to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    per_byte = 8 // bits
    padded = torch.zeros(-(-flat.numel() // per_byte) * per_byte, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # (per_byte,)
    return (padded.reshape(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8).contiguous()


def tensor_bytes(path: Path) -> int:
    """Sum of numel * element size over every tensor in a safetensors file (the header not counted)."""
    return sum(module_tensor_bytes(path).values())


def module_tensor_bytes(path: Path) -> dict[str, int]:
    """{full Linear name: bytes of its factors' tensors} in an adapter file (either form), counted tensor
    by tensor (numel * element size)."""
    from safetensors import safe_open

    counted: dict[str, int] = {}
    with safe_open(path, "pt") as handle:
        for key in handle.keys():
            name = key.removeprefix(PEFT_PREFIX).partition(".lora_")[0]
            counted[name] = counted.get(name, 0) + handle.get_tensor(key).nbytes
    return counted


def vllm_max_lora_rank(max_rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds max_rank; None if none does."""
    return next((r for r in VLLM_LORA_RANKS if r >= max_rank), None)


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()

