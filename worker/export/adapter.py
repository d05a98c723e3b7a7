"""The compensation as a PEFT LoRA adapter, written without building a PeftModel.

PEFT computes W x + scaling * B (A x) with scaling = lora_alpha / r. Squeeze's compensated Linear
computes W x + B (A x), so every module gets alpha = its own rank (scaling exactly 1). Ranks may
differ per module (rank budgets): `r`/`lora_alpha` hold the most common rank and `rank_pattern` /
`alpha_pattern` list every other module by its FULL dotted path. PEFT matches pattern keys against
the end of module names, so a short key like "q_proj" would hit every layer; a full path hits one.
vLLM reads each module's rank from the tensor shapes and applies one scaling lora_alpha / r; with
alpha = r everywhere that scaling is 1 for every module too.

Modules whose allocated rank is 0 carry no adapter and are not targeted.
Factors are stored in fp32, bit for bit the ones the job evaluated (CompensatedLinear runs the
low-rank path in fp32); with adapter_bits they are the dequantized values (PEFT files have no
quantized-LoRA layout).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

ADAPTER_DIR = "adapter"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The base model sits one folder up; PEFT records it, PeftModel.from_pretrained does not need it.
BASE_MODEL_PATH = ".."
# vLLM's --max-lora-rank accepts only these values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class AdapterInfo:
    path: str  # relative to the export folder
    r: int  # the config's default rank (the most common one)
    max_rank: int
    ranks: dict[str, int] = field(repr=False)  # full module name -> rank, adapted modules only
    params: int


def save_adapter(adapters: dict[str, tuple[Tensor, Tensor]], out_dir: Path) -> AdapterInfo:
    """adapters: {full Linear name: (B (d_out, r), A (r, d_in))}, as unwrap_adapters returns them."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapters = {name: (b, a) for name, (b, a) in adapters.items() if a.shape[0] > 0}
    if not adapters:
        raise ValueError("no module has a rank > 0: there is no adapter to save")
    ranks = {name: a.shape[0] for name, (_, a) in adapters.items()}
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
    tensors = {}
    for name, (lora_b, lora_a) in adapters.items():
        # PEFT's saved key names: the PeftModel prefix, the module path, no adapter name.
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.detach().to(torch.float32).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.detach().to(torch.float32).cpu().contiguous()
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    params = sum(b.numel() + a.numel() for b, a in adapters.values())
    return AdapterInfo(path=ADAPTER_DIR, r=default_rank, max_rank=max(ranks.values()), ranks=ranks, params=params)


def vllm_max_lora_rank(max_rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds max_rank; None if none does."""
    return next((r for r in VLLM_LORA_RANKS if r >= max_rank), None)
