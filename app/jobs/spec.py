"""The job spec: what a client asks for, validated once at the boundary.

Each section maps one-to-one onto a typed config of the compression math
(worker/compression/specs.py). Unknown fields are errors; so are impossible combinations.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from worker.engines import VLLM_LORA_RANKS, VLLM_WNA16_BITS

INT64_MAX = 2**63 - 1
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128  # quantization's, without a size target
NAME = Field(min_length=1, max_length=255)  # split and field names
URI = Field(min_length=1, max_length=1024)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Strict):
    id: Annotated[str, Field(min_length=1, max_length=512)] = Field(
        description="Hugging Face Hub model id, or a local directory when the server allows local paths."
    )
    revision: Annotated[str, Field(min_length=1, max_length=255)] = "main"


class Quantization(Strict):
    method: Literal["rtn", "gptq"] = "gptq"
    # Defaults 4 and 128 (JobSpec fills them in); left None with target.bits_per_weight, which chooses them.
    # The schema shows the defaults JobSpec fills in (what the dashboard's form and docs/api.md show).
    bits: Literal[2, 3, 4, 8] | None = Field(None, description="Default 4; chosen per Linear with a size target.",
                                             json_schema_extra={"default": DEFAULT_BITS})
    group_size: int | None = Field(None, description="Input columns per scale/zero point; -1 = per output "
                                   "channel. Default 128; chosen per Linear with a size target.",
                                   json_schema_extra={"default": DEFAULT_GROUP_SIZE})
    symmetric: bool = False
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ damping, as a fraction of mean(diag(H)).")
    act_order: bool = Field(
        True, description="GPTQ: visit columns by descending diag(H), with static groups (no g_idx in the export). "
        "Default: on for GPTQ; off for RTN and with sparsity.method 'sparsegpt' (one joint pass in column order).",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and not (value >= 8 and value & (value - 1) == 0):
            raise ValueError("group_size must be -1 (per channel) or a power of two >= 8")
        return value


_PATTERN = re.compile(r"^(\d+):(\d+)$")


class Sparsity(Strict):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    ratio: float | None = Field(None, gt=0, lt=1, description="Unstructured: fraction of weights set to zero.")
    pattern: str | None = Field(None, description='Semi-structured N:M, e.g. "2:4" or "4:8".')

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = _PATTERN.match(value)
        if not match:
            raise ValueError('pattern must look like "N:M", e.g. "2:4"')
        n, m = int(match[1]), int(match[2])
        if not (0 < n < m <= 32):
            raise ValueError("pattern N:M needs 0 < N < M <= 32")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> Sparsity:
        if (self.ratio is None) == (self.pattern is None):
            raise ValueError("give exactly one of ratio (unstructured) or pattern (N:M)")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


class RankBudget(Strict):
    params: int | None = Field(None, gt=0, le=INT64_MAX, description="Total adapter parameters across all Linears.")
    fraction: float | None = Field(None, gt=0, le=1, description="Budget as a fraction of the Linear parameters.")
    criterion: Literal["relative", "absolute"] = Field(
        "relative", description="Rank units go where they reduce the most output error per parameter: relative "
        "to each module's output norm ||WX|| (default, better on SmolLM2), or absolute.")
    min_rank: int = Field(0, ge=0, description="A rank every Linear gets before the rest of the budget is "
                          "allocated by the criterion; the budget must cover it. At most the server's max_rank.")

    @model_validator(mode="after")
    def _one_of(self) -> RankBudget:
        if (self.params is None) == (self.fraction is None):
            raise ValueError("give exactly one of params or fraction")
        return self


class Compensation(Strict):
    method: Literal["eora", "svd", "none"] = "eora"
    rank: int | None = Field(None, ge=1, description="Fixed rank for every Linear; at most the server's max_rank. "
                             "A rank at or above a Linear's dense-delta crossover d_out*d_in/(d_out+d_in) is capped "
                             "below it (the job's notes say so).")
    rank_budget: RankBudget | None = None
    adapter_bits: Literal[4, 8] | None = Field(None, description="Quantize the adapters themselves (group-wise).")
    damp: float = Field(1.0, ge=0, le=100, description="EoRA: fraction of mean(diag(X^T X)) added to its diagonal "
                        "before the eigendecomposition; 0 = the paper's exact method. The default 1.0 was chosen "
                        "on held-out validation text (docs/benchmarks.md).")
    sink_tokens: int = Field(0, ge=0, le=64, description="Leading positions of each calibration window left out "
                             "of the compensation's X^T X (they still count for the compression): attention-sink "
                             "tokens carry massive activations that can own nearly all of it.")
    refine: int = Field(0, ge=0, le=8, description="Rounds of joint compression and compensation per Linear: "
                        "compress W - BA again (same Gram), refit BA to what that compression lost, and keep the "
                        "round with the least calibration error (round 0 is compress-then-compensate). Each round "
                        "costs one more compression and decomposition per Linear. Needs a fixed rank.")

    def above_max_rank(self, max_rank: int) -> tuple[str, str] | None:
        """(field, reason) when a rank asked for is above the server's max_rank (Settings.max_rank), else
        None: the one rule, checked at submission (app/jobs/service.py) and before any work (worker)."""
        if self.rank is not None and self.rank > max_rank:
            return "compensation.rank", f"at most {max_rank} on this server"
        if self.rank_budget is not None and self.rank_budget.min_rank > max_rank:
            return "compensation.rank_budget.min_rank", f"at most {max_rank} on this server"
        return None

    @model_validator(mode="after")
    def _rank(self) -> Compensation:
        if self.method == "none":
            if any((self.rank is not None, self.rank_budget is not None, self.adapter_bits is not None, self.refine)):
                raise ValueError("method 'none' takes no rank, rank_budget, adapter_bits or refine")
        elif self.rank is not None and self.rank_budget is not None:
            raise ValueError(f"method '{self.method}' needs exactly one of rank or rank_budget")
        if self.refine and self.rank is None:
            raise ValueError("refine needs a fixed rank (a rank budget allocates ranks after compressing once)")
        return self


class Target(Strict):
    bits_per_weight: float | None = Field(
        None, gt=0, le=16, description="Stored bits per weight over the decoder Linears (codes, scales, zero "
        "points, adapters as stored; as served, at fp16, for engine 'vllm'), counted from the artifact's files. "
        "The worker measures each Linear's error for every bit width, group size, adapter rank and adapter "
        "precision (fp16, 8 or 4 bits unless compensation.adapter_bits fixes it; fp16 for engine 'vllm') and "
        "chooses them per Linear to meet it with the least predicted loss; quantization.bits/group_size and "
        "compensation.rank/rank_budget are then not given.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What must load the artifact: 'vllm' allows only 4/8-bit weights, one scheme "
        "per set vLLM fuses (q/k/v, gate/up), adapter ranks from vLLM's set and fp16 adapters; 'transformers' "
        "allows every format the project exports.")


class Calibration(Strict):
    dataset: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        description="Hub dataset id, a local .txt/.jsonl/.parquet file, or upload:<id> from POST /v1/uploads."
    )
    split: Annotated[str, NAME] = "train"
    text_field: Annotated[str, NAME] = "text"
    num_samples: int = Field(128, ge=1, le=INT64_MAX)
    seq_len: int = Field(512, ge=16, le=INT64_MAX)
    seed: int = Field(0, ge=0, le=INT64_MAX, description="Fits 64 bits.")


class Evaluation(Strict):
    dataset: Annotated[str, URI] | None = Field(
        None, description="Held-out text for perplexity; default: a slice held back from the calibration source."
    )
    split: Annotated[str, NAME] = "validation"
    text_field: Annotated[str, NAME] = "text"
    num_windows: int = Field(32, ge=1, le=4096)
    seq_len: int | None = Field(None, ge=16, le=INT64_MAX, description="Default: calibration.seq_len.")


class Destination(Strict):
    uri: Annotated[str, Field(max_length=1024)] | None = Field(
        None, description="Local folder (inside the artifact root), s3://bucket/prefix or hf://org/repo. "
        "Default: <artifact root>/<job id>."
    )
    private: bool = Field(True, description="Hub: create the repo private.")
    create_repo: bool = Field(True, description="Hub: create the repo when it does not exist.")


class JobSpec(Strict):
    model: ModelRef
    quantization: Quantization | None = None
    sparsity: Sparsity | None = None
    compensation: Compensation | None = None
    target: Target | None = None
    calibration: Calibration
    evaluation: Evaluation = Evaluation()
    destination: Destination = Destination()
    webhook_url: str | None = Field(
        None, max_length=2048, description="POSTed (signed, retried) when the job succeeds, fails or is cancelled. "
        "https, resolving to public addresses only (unless the server allows private ones).",
    )
    hf_token: SecretStr | None = Field(
        None, description="Hugging Face token for this job (model download and Hub upload). Sealed with the "
        "server's key before it is stored, never returned, erased when the job ends.", exclude=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _bits_default(cls, data):
        """quantization.bits 4 and group_size 128 when not given, unless target.bits_per_weight chooses them."""
        quant = data.get("quantization") if isinstance(data, dict) else None
        target = data.get("target") if isinstance(data, dict) else None
        if isinstance(quant, dict) and not (isinstance(target, dict) and target.get("bits_per_weight") is not None):
            data = {**data, "quantization": {"bits": DEFAULT_BITS, "group_size": DEFAULT_GROUP_SIZE, **quant}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _act_order_default(cls, data):
        """act_order, when not given, is on for GPTQ alone and off for RTN (no column order) and for
        SparseGPT + GPTQ (one joint pass in column order): a default, never an error."""
        quant = data.get("quantization") if isinstance(data, dict) else None
        if isinstance(quant, dict) and "act_order" not in quant:
            sparsity = data.get("sparsity")
            sparse_method = (sparsity.get("method", Sparsity.model_fields["method"].default)
                             if isinstance(sparsity, dict) else None)
            method = quant.get("method", Quantization.model_fields["method"].default)
            data = {**data, "quantization": {**quant, "act_order": method == "gptq" and sparse_method != "sparsegpt"}}
        return data

    @model_validator(mode="after")
    def _combination(self) -> JobSpec:
        if self.quantization is None and self.sparsity is None:
            if self.compensation is not None and self.compensation.method != "none":
                raise ValueError("compensation: a rank needs compression to compensate (give quantization or sparsity)")
            raise ValueError("nothing to do: give quantization and/or sparsity")
        if (self.sparsity is not None and self.sparsity.method == "sparsegpt" and self.quantization is not None
                and self.quantization.method == "gptq" and self.quantization.act_order):
            raise ValueError("quantization.act_order: SparseGPT + GPTQ run as one pass in the original column "
                             "order; act_order is not available with sparsity.method 'sparsegpt'")
        c = self.compensation
        sized = self.target is not None and self.target.bits_per_weight is not None
        if c is not None and c.method != "none" and c.rank is None and c.rank_budget is None and not sized:
            raise ValueError(f"compensation: method '{c.method}' needs exactly one of rank or rank_budget (or "
                             "target.bits_per_weight, which chooses the ranks)")
        if sized:
            self._sized_target()
        elif self.quantization is not None and (self.quantization.bits is None or self.quantization.group_size is None):
            raise ValueError("quantization.bits and group_size are needed unless target.bits_per_weight chooses them")
        if self.target is not None and self.target.engine == "vllm":
            self._vllm_target()
        if c is not None and c.method != "none" and c.sink_tokens >= self.calibration.seq_len:
            raise ValueError(f"compensation.sink_tokens ({c.sink_tokens}) must be below calibration.seq_len "
                             f"({self.calibration.seq_len}): no calibration token would be left to compensate on")
        return self

    def _sized_target(self) -> None:
        """target.bits_per_weight chooses bits, group sizes and ranks: the spec may not fix them."""
        q, c = self.quantization, self.compensation
        if q is None:
            raise ValueError("target.bits_per_weight needs a quantization section (its method, symmetric, damp; "
                             "the bits and group sizes are chosen per Linear)")
        fixed = [name for name in ("bits", "group_size") if getattr(q, name) is not None]
        if fixed:
            raise ValueError(f"target.bits_per_weight chooses quantization.{' and '.join(fixed)} per Linear: "
                             "give one or the other")
        if c is not None and (c.rank is not None or c.rank_budget is not None or c.refine):
            raise ValueError("target.bits_per_weight chooses the adapter rank per Linear: give no "
                             "compensation.rank, rank_budget or refine")

    def _vllm_target(self) -> None:
        """What vLLM loads: 4/8-bit weights, fp16 adapters of a rank from its set."""
        q, c = self.quantization, self.compensation
        sized = self.target is not None and self.target.bits_per_weight is not None
        if q is not None and not sized and q.bits not in VLLM_WNA16_BITS:
            raise ValueError(f"target.engine 'vllm' loads {' and '.join(map(str, VLLM_WNA16_BITS))}-bit weights, "
                             f"not quantization.bits {q.bits}")
        if c is None or c.method == "none":
            return
        if c.adapter_bits is not None:
            raise ValueError("target.engine 'vllm' loads fp16 adapters: give no compensation.adapter_bits")
        if c.rank_budget is not None or (c.rank is not None and c.rank not in VLLM_LORA_RANKS):
            raise ValueError(f"target.engine 'vllm' takes adapter ranks {list(VLLM_LORA_RANKS)}: give one of them "
                             "as compensation.rank (a rank_budget allocates any rank), or target.bits_per_weight")
