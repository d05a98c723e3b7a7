"""Held-out perplexity, computed layer by layer like compression (one decoder layer on the device)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.sequential import LayerSource, layer_source, walk_layers


@torch.no_grad()
def iter_logits(
    model: nn.Module | LayerSource, windows: Tensor, device: torch.device, batch_size: int = 8
) -> Iterator[tuple[Tensor, Tensor]]:
    """(window batch (b, L), logits (b, L, vocab) fp32 on device) per batch of windows.

    model: a model loaded whole, or a layer source (worker.stream). The decoder layers run one at a
    time on the device; the final norm and lm_head (with a tied embedding, that weight too) are
    materialised, and visit the device, only while logits are computed.
    """
    source = layer_source(model)
    final_hidden = walk_layers(source, windows, device, batch_size)  # per batch (b, L, hidden), CPU
    with source.parts("final_norm", "lm_head"):
        head = [source.arch.module(source.model, "final_norm"), source.arch.module(source.model, "lm_head")]
        for module in head:
            module.to(device)
        try:
            for batch, hidden in zip(windows.split(batch_size), final_hidden, strict=True):
                yield batch, source.arch.logits(source.model, hidden.to(device)).float()
        finally:
            for module in head:
                module.to("cpu")


def perplexity(model: nn.Module | LayerSource, windows: Tensor, device: torch.device, batch_size: int = 8) -> float:
    """exp(mean token NLL): every window predicts its tokens 1..L-1 from the tokens before them."""
    nll = 0.0
    predicted = 0
    for batch, logits in iter_logits(model, windows, device, batch_size):
        targets = batch[:, 1:].to(device)  # (b, L-1)
        predicting = logits[:, :-1].reshape(-1, logits.shape[-1])  # a copy: (b * (L-1), vocab)
        del logits  # so that at most two (b, L, vocab) tensors live at once (with cross_entropy's log-softmax)
        loss = F.cross_entropy(predicting, targets.reshape(-1), reduction="sum")
        del predicting
        nll += float(loss.double())
        predicted += targets.numel()
    if not math.isfinite(nll):
        raise FloatingPointError("perplexity: the negative log-likelihood is not finite")
    return math.exp(nll / predicted)
