"""Typed configs for the compression math, one per concern.

The HTTP job spec (app/jobs/spec.py) owns every default a user gets; worker.job_plan.compression_plan
maps it one-to-one onto these. So the policy fields (what a job asks for) have no defaults here:
whoever builds a spec says every value. Only knobs the job spec does not expose keep a default, and
this is then their one owner. Algorithm code only ever sees these frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    method: Literal["rtn", "gptq"]
    bits: int  # 2, 3, 4 or 8
    group_size: int  # input columns sharing one scale/zero; -1 = one group per output row
    symmetric: bool
    damp: float  # GPTQ (and SparseGPT + GPTQ): fraction of mean(diag(H)) added to the diagonal
    act_order: bool  # GPTQ: visit columns by descending diag(H)
    block_size: int = 128  # GPTQ: columns updated together (not in the job spec)


@dataclass(frozen=True, kw_only=True)
class SparsitySpec:
    method: Literal["magnitude", "wanda", "sparsegpt"]
    ratio: float | None = None  # unstructured: fraction of weights set to zero
    n: int | None = None  # N:M: keep n of every m consecutive input weights
    m: int | None = None
    damp: float = 0.01  # SparseGPT alone (not in the job spec); with GPTQ the quantizer's damp applies
    block_size: int = 128

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def pattern(self) -> str:
        """"2:4" style for N:M, else "unstructured"."""
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


@dataclass(frozen=True, kw_only=True)
class CompensationSpec:
    method: Literal["eora", "svd", "none"]
    rank: int | None = None  # fixed rank per Linear
    budget_params: int | None = None  # or a global budget in parameters ...
    budget_fraction: float | None = None  # ... or as a fraction of the original Linear parameters
    max_rank: int  # the server's limit (Settings.max_rank)
    adapter_bits: int | None  # quantize A and B group-wise (e.g. 4), None = keep fp16
    adapter_group_size: int = 64  # not in the job spec
    # Budget allocation: "relative" ranks modules by error reduced relative to ||W|| in the norm the
    # decomposition minimises (||W X|| for exact EoRA); "absolute" by the error reduced itself.
    budget_criterion: Literal["absolute", "relative"]
    min_rank: int  # budget only: a rank every module gets before the budget's rest is allocated
    damp: float  # EoRA: fraction of mean(diag(gram)) added to the Gram's diagonal; 0 = exact EoRA
    # Leading positions of every calibration window left out of the compensation's Gram (they still
    # count for the compression itself): attention-sink tokens carry massive activations that can own
    # nearly all of X^T X (99.8 % of its trace at SmolLM2-135M layer 11 down_proj).
    sink_tokens: int
    # Rounds of joint compression and compensation (fixed rank only): compress W - BA, refit BA on what
    # that lost, keep the round with the least calibration error; 0 = compress, then compensate.
    refine: int
