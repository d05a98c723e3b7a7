"""Held-out perplexity, computed layer by layer like compression (one decoder layer on the device)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.activations import HOST, Placement
from worker.sequential import LayerSource, layer_source, walk_layers


@torch.no_grad()
def iter_logits(
    model: nn.Module | LayerSource, windows: Tensor, device: torch.device, batch_size: int = 8,
    head_batch: int | None = None, placement: Placement = HOST,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(window batch (b, L), logits (b, L, vocab) fp32 on device) per batch of windows.

    model: a model loaded whole, or a layer source (worker.stream). The decoder layers run one at a
    time on the device; the final norm and lm_head (with a tied embedding, that weight too) are
    materialised, and visit the device, only while logits are computed. head_batch: logits for that
    many windows at a time (b <= head_batch), since (b, L, vocab) is the largest tensor of a
    small model's evaluation (SmolLM2, 8 x 512 windows: 805 MB); None = batch_size. placement: where
    the activations between layers live (worker.activations).
    """
    source = layer_source(model)
    final_hidden = walk_layers(source, windows, device, batch_size, placement)  # per batch (b, L, hidden)
    with final_hidden, source.parts("final_norm", "lm_head"):
        head = [source.arch.module(source.model, "final_norm"), source.arch.module(source.model, "lm_head")]
        for module in head:
            module.to(device)
        try:
            for batch, hidden in zip(windows.split(batch_size), final_hidden, strict=True):
                step = head_batch or batch_size
                for rows, part in zip(batch.split(step), hidden.split(step), strict=True):
                    yield rows, source.arch.logits(source.model, part.to(device)).float()
        finally:
            for module in head:
                module.to("cpu")


def perplexity(model: nn.Module | LayerSource, windows: Tensor, device: torch.device, batch_size: int = 8,
               placement: Placement = HOST) -> float:
    """exp(mean token NLL): every window predicts its tokens 1..L-1 from the tokens before them.

    The NLL is summed window by window (fp32 within a window, fp64 across), with one window's logits
    in memory at a time."""
    nll = 0.0
    predicted = 0
    for window, logits in iter_logits(model, windows, device, batch_size, head_batch=1, placement=placement):
        targets = window[:, 1:].to(device)  # (1, L-1)
        predicting = logits[:, :-1].reshape(-1, logits.shape[-1])  # a copy: (L-1, vocab)
        del logits  # at most two (1, L, vocab) tensors live at once (with cross_entropy's log-softmax)
        loss = F.cross_entropy(predicting, targets.reshape(-1), reduction="sum")
        del predicting
        nll += float(loss.double())
        predicted += targets.numel()
    if not math.isfinite(nll):
        raise FloatingPointError("perplexity: the negative log-likelihood is not finite")
    return math.exp(nll / predicted)
