"""Pure tensor math of compression: statistics, quantization, pruning, low-rank compensation.

Only torch is imported here; the layer loop, hooks and progress live in worker/sequential.py.
"""

from worker.compression.adapters import quantize_adapter
from worker.compression.eora import (
    LowRankFactors,
    eora,
    eora_decompose,
    projected_singular_values,
    svd_baseline,
    svd_decompose,
)
from worker.compression.gptq import gptq_quantize
from worker.compression.gram import accumulate_gram
from worker.compression.prune import magnitude_scores, mask_from_scores, prune, wanda_scores
from worker.compression.quantize import QuantizedWeight, dequantize, quant_params, quantize_rtn
from worker.compression.ranks import allocate_ranks, budget_from_fraction
from worker.compression.sparsegpt import sparsegpt_prune
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec

__all__ = [
    "CompensationSpec",
    "LowRankFactors",
    "QuantSpec",
    "QuantizedWeight",
    "SparsitySpec",
    "accumulate_gram",
    "allocate_ranks",
    "budget_from_fraction",
    "dequantize",
    "eora",
    "eora_decompose",
    "gptq_quantize",
    "magnitude_scores",
    "mask_from_scores",
    "projected_singular_values",
    "prune",
    "quant_params",
    "quantize_adapter",
    "quantize_rtn",
    "sparsegpt_prune",
    "svd_baseline",
    "svd_decompose",
    "wanda_scores",
]
