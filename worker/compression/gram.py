"""Second-moment statistics of a Linear layer's inputs: S = X^T X / N, accumulated chunk by chunk."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_gram(x: Tensor, gram: Tensor | None, n: int) -> tuple[Tensor, int]:
    """Fold a chunk of activations into the running mean of x^T x.

    x: (..., d_in) in any float dtype; every leading index is one token. gram: (d_in, d_in) fp32
    running mean over the n tokens seen so far, or None before the first chunk. Returns the
    updated (gram, n + tokens); the given gram is updated in place (one fp32 addmm, no d_in^2 copy)
    when it is already fp32 on x's device.

    Running-mean form gram * n/(n+t) + x^T x/(n+t) keeps the entries O(|x|^2) however many tokens
    are seen, so fp32 neither overflows nor loses small chunks against a huge sum.
    """
    d_in = x.shape[-1]
    tokens = x.reshape(-1, d_in).to(torch.float32)  # (t, d_in)
    t = tokens.shape[0]
    if gram is None:
        gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=x.device)
        n = 0
    elif gram.shape != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({d_in}, {d_in})")
    else:
        gram = gram.to(device=x.device, dtype=torch.float32)
    if t == 0:
        return gram, n
    total = n + t
    gram.addmm_(tokens.T, tokens, beta=n / total, alpha=1.0 / total)  # (d_in, d_in)
    return gram, total
