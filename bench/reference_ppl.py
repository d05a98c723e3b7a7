"""Sanity check of the prepared data: fp32 SmolLM2-135M perplexity on the evaluation protocol.

    python -m bench.reference_ppl [--data bench/.data] [--windows 80] [--window 512] [--threads 1]

Protocol: tokenize the whole of ``wiki_eval.txt`` as one string (no special tokens), cut the first
``windows`` non-overlapping ``window``-token windows, run each window on its own (no context carried
over), standard causal-LM loss (each token predicted from the ones before it in its window, so
``window - 1`` predictions per window); perplexity = exp(mean NLL over all predicted tokens).
This is a reference number only; the benchmark proper lives in bench/quality.py.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.data import DEFAULT_OUT, MODEL_DIR, WIKI_FILE


def eval_windows(tokenizer, text: str, windows: int, window: int):
    import torch

    ids = tokenizer(text, add_special_tokens=False).input_ids
    need = windows * window
    if len(ids) < need:
        raise SystemExit(f"{WIKI_FILE} has {len(ids)} tokens, protocol needs {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(windows, window)


def perplexity(model, batches, batch_size: int = 1) -> tuple[float, float, int]:
    import torch
    import torch.nn.functional as F

    nll_sum, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, batches.shape[0], batch_size):
            x = batches[i:i + batch_size]
            logits = model(x).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum")
            nll_sum += loss.item()
            count += x[:, 1:].numel()
    mean_nll = nll_sum / count
    return math.exp(mean_nll), mean_nll, count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reference_ppl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--windows", type=int, default=80)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.data / MODEL_DIR)
    tok.model_max_length = 10**9
    model = AutoModelForCausalLM.from_pretrained(args.data / MODEL_DIR, dtype=getattr(torch, args.dtype)).eval()
    batches = eval_windows(tok, (args.data / WIKI_FILE).read_text(encoding="utf-8"), args.windows, args.window)
    t0 = time.time()
    ppl, nll, n = perplexity(model, batches)
    dt = time.time() - t0
    print(f"{args.dtype} perplexity on first {args.windows} x {args.window} tokens of {WIKI_FILE}: {ppl:.4f} "
          f"(mean NLL {nll:.5f} over {n} predicted tokens; {dt:.1f}s, {batches.numel() / dt:.0f} tok/s, "
          f"{args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
