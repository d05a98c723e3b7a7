"""What a compression run is asked to do (CompressionPlan) and what it reports, per module and layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from worker.compression.quantize import QuantizedWeight
from worker.compression.specs import CompensationSpec, QuantSpec, SparsitySpec

ADAPTER_BITS = (1, 2, 4, 8)  # what the adapter file packs densely into bytes (worker.export.adapter.pack_bits)


@dataclass(frozen=True)
class CompressionPlan:
    quant: QuantSpec | None = None
    sparsity: SparsitySpec | None = None
    compensation: CompensationSpec | None = None
    # Mixed precision: full Linear name ("model.layers.0.mlp.down_proj") -> its own quantizer, in place
    # of `quant` for that module; the modules not named here use `quant`.
    module_quant: Mapping[str, QuantSpec] = field(default_factory=dict)
    # Per-module adapter ranks (0 = no adapter), in place of compensation.rank for the modules named.
    module_rank: Mapping[str, int] = field(default_factory=dict)
    # Per-module adapter precision (None = fp16 factors, else the bits of their codes), in place of
    # compensation.adapter_bits for the modules named (a size target chooses it per Linear).
    module_adapter_bits: Mapping[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Invariants only; the rules a user sees (and their messages) live in app/jobs/spec.py and, for
        the server's max_rank, app/jobs/service.py."""
        if self.module_quant and self.quant is None:
            raise ValueError("per-module quantizers need a plan that quantizes (quant is None)")
        spec = self.compensation
        if self.module_rank and (spec is None or spec.rank is None
                                 or not all(0 <= r <= spec.max_rank for r in self.module_rank.values())):
            raise ValueError("per-module ranks need a fixed-rank compensation and ranks in 0..max_rank")
        if self.module_adapter_bits and (not self.compensates or not all(
                bits is None or bits in ADAPTER_BITS for bits in self.module_adapter_bits.values())):
            raise ValueError(f"per-module adapter precisions need a compensation and bits in {ADAPTER_BITS} or None")
        if spec is None or spec.method == "none":
            return
        if not self.compresses:
            raise ValueError("compensation needs quantization or sparsity: there is no error to compensate")
        given = [spec.rank is not None, spec.budget_params is not None, spec.budget_fraction is not None]
        if (sum(given) != 1 or spec.sink_tokens < 0 or not 0 <= spec.min_rank <= spec.max_rank
                or (spec.rank is not None and not 1 <= spec.rank <= spec.max_rank)):
            raise ValueError(f"inconsistent compensation plan: {spec}")

    def quant_for(self, name: str) -> QuantSpec | None:
        """The quantizer of the Linear with full dotted name `name`."""
        return self.module_quant.get(name, self.quant)

    def rank_for(self, name: str) -> int:
        """The adapter rank of the Linear `name` (fixed-rank plans)."""
        return self.module_rank.get(name, self.compensation.rank)

    def compensation_for(self, name: str) -> CompensationSpec:
        """The compensation of the Linear `name`, with its own adapter precision."""
        if name not in self.module_adapter_bits:
            return self.compensation
        return replace(self.compensation, adapter_bits=self.module_adapter_bits[name])

    @property
    def compresses(self) -> bool:
        return self.quant is not None or self.sparsity is not None

    @property
    def compensates(self) -> bool:
        return self.compensation is not None and self.compensation.method != "none"

    @property
    def uses_budget(self) -> bool:
        return self.compensates and self.compensation.rank is None


@dataclass
class ModuleReport:
    name: str  # full dotted name, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, int]  # (d_out, d_in)
    quantized: QuantizedWeight | None  # codes/scales/zeros for export; .weight is the model's weight
    sparsity: str | None  # "2:4" style pattern, "unstructured", or None
    zero_fraction: float  # measured share of exactly-zero weights after compression
    error_before: float  # ||(W - Wc) X|| / ||W X|| on the calibration Gram
    compress_seconds: float
    rank: int = 0
    error_after: float | None = None  # with the adapter, on the same Gram; None without compensation
    compensate_seconds: float = 0.0
    adapter_params: int = 0
    adapter_bytes: int = 0
    adapter_bits: int | None = None  # the adapter's stored precision, None = fp16 factors (or no adapter)
    refine_errors: list[float] = field(default_factory=list)  # error_after of each joint round (round 0 first)


@dataclass
class LayerReport:
    stage: str  # "compress" or "compensate" (the second walk of a rank-budget plan)
    index: int  # decoder layer, 0-based
    total: int  # decoder layers
    step: int  # 1-based count of layer reports so far in this run
    steps: int  # layer reports this run will make (layers x walks)
    seconds: float
    modules: list[ModuleReport]


@dataclass
class CompressionResult:
    modules: dict[str, ModuleReport]
    calibration_seconds: float = 0.0  # capturing layer inputs and the Gram forwards
    compression_seconds: float = 0.0  # pruning and quantization
    compensation_seconds: float = 0.0  # decompositions and rank allocation
    statistics_seconds: float = 0.0  # relative output errors
    propagation_seconds: float = 0.0  # forwards making the next layer's inputs
    transfer_seconds: float = 0.0  # moving layers between CPU and the device
    budget_params: int | None = None  # the resolved global budget, if the plan had one
    notes: list[str] = field(default_factory=list)  # for the job's notes: capped ranks, no adapter, ...

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def adapter_params(self) -> int:
        return sum(m.adapter_params for m in self.modules.values())

    @property
    def adapter_bytes(self) -> int:
        return sum(m.adapter_bytes for m in self.modules.values())
