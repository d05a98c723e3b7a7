import torch

from worker.compression.gram import accumulate_gram


def test_chunks_equal_one_shot_fp64(inputs):
    chunks = [inputs[:100], inputs[100:101], inputs[101:512].reshape(3, 137, 64)]  # (..., d_in)
    gram, n = None, 0
    for chunk in chunks:
        gram, n = accumulate_gram(chunk, gram, n)
    x64 = inputs.double()
    expected = x64.T @ x64 / x64.shape[0]
    assert n == 512
    assert gram.dtype == torch.float64 and gram.shape == (64, 64)
    # fp64 accumulation of 512 products of O(1) terms in a running mean: ~1e-15 relative.
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def test_low_precision_chunks_accumulate_in_fp64(inputs):
    x = inputs.to(torch.bfloat16)
    gram, n = accumulate_gram(x[:256], None, 0)
    gram, n = accumulate_gram(x[256:], gram, n)
    x64 = x.double()  # the bf16 values themselves, exactly
    expected = x64.T @ x64 / 512
    # Only fp64 rounding on top of exact bf16 inputs.
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def test_empty_chunk_changes_nothing(inputs):
    gram, n = accumulate_gram(inputs, None, 0)
    before = gram.clone()
    gram, n2 = accumulate_gram(inputs[:0], gram, n)
    assert n2 == n
    assert torch.equal(gram, before)
