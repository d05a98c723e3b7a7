"""The statistics hooks of a decoder layer: one forward hook per input group (q/k/v share one, gate/up
share one) folding the group's inputs into its second moments x^T x while the layer runs (gram_hooks,
GramAccumulator), and the finished Grams a group's Linears are compressed and compensated with (Grams).
The hooks only accumulate and are always removed; the math is worker.compression.gram, and the layer
loop whose forwards they watch is worker.sequential's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor, nn

from worker.compression.eora import Eigenspace
from worker.compression.gram import accumulate_gram
from worker.models import Architecture


class Grams(NamedTuple):
    """One input group's second moments: what the compression weighs its error by, and what the
    compensation does (the same tensor unless sink_tokens > 0), with the latter's eigendecomposition
    made once for every module of the group (EoRA)."""

    compress: Tensor  # (d_in, d_in) fp64
    compensate: Tensor  # (d_in, d_in) fp64
    space: Eigenspace | None = None


class GramAccumulator:
    """x^T x over every token, and with skip > 0 also over the positions >= skip of each window
    (a second accumulation, so the first stays the exact Gram the compression sees)."""

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip
        self.gram: Tensor | None = None  # (d_in, d_in) fp64 running mean of x^T x
        self.tokens = 0
        self.body: Tensor | None = None  # same, positions >= skip only; None while skip == 0
        self.body_tokens = 0

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0].detach()  # (batch, seq, d_in)
        self.gram, self.tokens = accumulate_gram(x, self.gram, self.tokens)
        if self.skip:
            self.body, self.body_tokens = accumulate_gram(x[:, self.skip :], self.body, self.body_tokens)


@contextmanager
def gram_hooks(
    layer: nn.Module, arch: Architecture, skip: int = 0
) -> Iterator[dict[tuple[str, ...], GramAccumulator]]:
    """One Gram per input group (q/k/v share one, gate/up share one), hooked on the group's first
    Linear; the hooks are always removed on exit. skip: see GramAccumulator."""
    accumulators = {group: GramAccumulator(skip) for group in arch.linear_groups}
    handles = []
    try:
        for group, acc in accumulators.items():
            handles.append(layer.get_submodule(group[0]).register_forward_hook(acc.hook))
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
