"""Typed configs for the compression math, one per concern.

The HTTP job spec (app/jobs/spec.py) maps one-to-one onto these; algorithm code only ever sees these
frozen dataclasses, never loose dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantSpec:
    method: Literal["rtn", "gptq"] = "gptq"
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # input columns sharing one scale/zero; -1 = one group per output row
    symmetric: bool = False
    damp: float = 0.01  # GPTQ: fraction of mean(diag(H)) added to the diagonal
    act_order: bool = False  # GPTQ: visit columns by descending diag(H)
    block_size: int = 128  # GPTQ: columns updated together


@dataclass(frozen=True)
class SparsitySpec:
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    ratio: float | None = None  # unstructured: fraction of weights set to zero
    n: int | None = None  # N:M: keep n of every m consecutive input weights
    m: int | None = None
    damp: float = 0.01  # SparseGPT damping, as GPTQ
    block_size: int = 128

    @property
    def is_nm(self) -> bool:
        return self.n is not None


@dataclass(frozen=True)
class CompensationSpec:
    method: Literal["eora", "svd", "none"] = "eora"
    rank: int | None = None  # fixed rank per Linear
    budget_params: int | None = None  # or a global budget in parameters ...
    budget_fraction: float | None = None  # ... or as a fraction of the original Linear parameters
    max_rank: int = 512
    adapter_bits: int | None = None  # quantize A and B group-wise (e.g. 4), None = keep fp16
    adapter_group_size: int = 64
    # Budget allocation: "relative" ranks modules by error reduced relative to ||W|| in the norm the
    # decomposition minimises (||W X|| for exact EoRA; measured better on SmolLM2, docs/benchmarks.md);
    # "absolute" by the error reduced itself.
    budget_criterion: Literal["absolute", "relative"] = "relative"
    min_rank: int = 0  # budget only: a rank every module gets before the budget's rest is allocated
    damp: float = 0.0  # EoRA: fraction of mean(diag(gram)) added to the Gram's diagonal; 0 = exact EoRA
    # Leading positions of every calibration window left out of the compensation's Gram (they still
    # count for the compression itself): attention-sink tokens carry massive activations that can own
    # nearly all of X^T X (99.8 % of its trace at SmolLM2-135M layer 11 down_proj).
    sink_tokens: int = 0
