"""Low-rank compensation of a compression error dW = W - Wc: EoRA (arXiv 2410.21271) and plain SVD.

EoRA minimises E||(dW - BA) x||^2 over the calibration inputs: with S = E[x x^T] = Q diag(l) Q^T,
E||E x||^2 = ||E Q diag(sqrt l)||_F^2, so the best rank-r BA is the rank-r SVD of the projected
error dW' = dW Q diag(sqrt l), mapped back through diag(1/sqrt l) Q^T. A direction is absent from
the calibration data only when its eigenvalue is below the rounding noise of S (gram_noise); absent
directions are dropped (never clamped): the adapter then does nothing along them. With damping no
direction is absent. The SVD baseline (ZeroQuant-V2 / LoRC) minimises ||dW - BA||_F instead.

Decompose once (eora_decompose / svd_decompose), read the singular values for rank allocation,
then cut the factors at any rank with .lowrank(rank). The Gram's eigendecomposition (gram_eigenspace)
is the costly part at large widths; modules sharing an input pass it in once computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from worker.compression.gptq import check_finite


@dataclass
class LowRankFactors:
    """dW ~ U diag(S) Vh back, all fp64, over the real directions only (S > 0 above rounding); back is
    None for plain SVD (identity)."""

    u: Tensor  # (d_out, p)
    s: Tensor  # (p,), descending
    vh: Tensor  # (p, k): rows over the kept eigen-directions (k = d_in for plain SVD)
    back: Tensor | None  # (k, d_in) = diag(1/sqrt l) Q^T, or None
    d_in: int

    @property
    def singular_values(self) -> Tensor:
        """(p,) fp32, descending: sigma_i^2 is the error removed by the i-th rank."""
        return self.s.to(torch.float32)

    def truncated(self, max_rank: int) -> LowRankFactors:
        """Drop directions beyond max_rank (frees memory while ranks are being allocated)."""
        r = min(max_rank, self.s.shape[0])
        return LowRankFactors(self.u[:, :r], self.s[:r], self.vh[:r], self.back, self.d_in)

    def lowrank(self, rank: int) -> tuple[Tensor, Tensor]:
        """(B (d_out, r), A (r, d_in)) fp32 with B A the best rank-r fit, r = min(rank, real
        directions): never zero-padded, so A's row count is the adapter's true rank."""
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        r = min(rank, self.s.shape[0])
        root = self.s[:r].sqrt()  # (r,)
        b = self.u[:, :r] * root.unsqueeze(0)  # (d_out, r)
        a = root.unsqueeze(1) * self.vh[:r]  # (r, k)
        if self.back is not None:
            a = a @ self.back  # (r, d_in)
        return b.to(torch.float32), a.to(torch.float32)


def _real_directions(u: Tensor, s: Tensor, vh: Tensor, back: Tensor | None, d_in: int,
                     given: torch.dtype) -> LowRankFactors:
    """Keep the singular triplets above rounding: s_i > s_max * max(max(m, n) eps(fp64), eps(given)),
    the fp64 SVD's own error (as torch.linalg.matrix_rank) or that of dW as given (fp32: a rank-4
    error stored in fp32 has further singular values ~2e-8 s_max). The rest are not directions."""
    if s.numel():
        real = int((s > s[0] * real_rtol((u.shape[0], vh.shape[1]), given)).sum())
        u, s, vh = u[:, :real], s[:real], vh[:real]
    signs = canonical_signs(u)
    return LowRankFactors(u * signs, s, vh * signs.unsqueeze(1), back, d_in)


def real_rtol(shape: tuple[int, ...], given: torch.dtype) -> float:
    """The relative cut below which a singular value of a (m, n) matrix stored in `given` is rounding, not a
    direction (see _real_directions)."""
    return max(max(shape) * torch.finfo(torch.float64).eps, torch.finfo(given).eps)


def canonical_signs(u: Tensor) -> Tensor:
    """(p,) +-1 that make each column of u (d_out, p) positive at its largest-magnitude entry. A singular
    pair's sign is the solver's choice (LAPACK and cuSOLVER differ); quantized adapter factors are not
    symmetric under it, so the directions are stored in this one orientation on every device and by
    every route that finds them (worker.candidates)."""
    if u.shape[1] == 0:
        return u.new_ones(0)
    picked = u.gather(0, u.abs().argmax(dim=0, keepdim=True)).squeeze(0)  # (p,)
    return torch.where(picked < 0, -1.0, 1.0).to(u.dtype)


def _check(dw: Tensor, gram: Tensor | None, name: str) -> None:
    if dw.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight error, got shape {tuple(dw.shape)}")
    check_finite(dw, "weight error", name)
    if gram is not None:
        if gram.shape != (dw.shape[1], dw.shape[1]):
            raise ValueError(f"{name}: gram {tuple(gram.shape)} does not match dW {tuple(dw.shape)}")
        check_finite(gram, "gram", name)


def gram_noise(gram: Tensor) -> float:
    """Bound on the rounding noise in the eigenvalues of gram (d_in, d_in), in its own dtype.

    Each entry of an accumulated mean of x x^T is off by at most ~k eps |x_i| |x_j| summed over the
    tokens, <= k eps sqrt(S_ii S_jj) (Cauchy-Schwarz); that error matrix has spectral norm
    <= k eps tr(S), and by Weyl's inequality moves each eigenvalue by at most that much. eigh adds
    ~d_in eps ||S||_2 <= d_in eps tr(S). k = d_in covers both (blocked BLAS sums grow far slower than
    d_in for any realistic chunk count). The scale is tr(S), never l_max alone: both are ~tr(S) when
    one outlier direction holds most of the energy, and what separates real directions from noise
    is then the precision S was accumulated in (fp64: gram.GRAM_DTYPE).
    """
    trace = float(gram.diagonal().to(torch.float64).clamp(min=0.0).sum())
    return gram.shape[0] * torch.finfo(gram.dtype).eps * trace


@dataclass(frozen=True)
class Eigenspace:
    """The eigen-directions of a (damped) Gram that EoRA projects onto: S ~ Q diag(l) Q^T over the
    kept directions. One per Gram: modules that share an input (q/k/v, gate/up) share it."""

    q: Tensor  # (d_in, k) fp64, orthonormal columns
    root: Tensor  # (k,) fp64, sqrt(l) of the kept directions
    damp: float


def gram_eigenspace(gram: Tensor, name: str = "", damp: float = 0.0) -> Eigenspace:
    """The eigendecomposition eora_decompose projects onto, of gram (d_in, d_in).

    damp > 0 adds damp * mean(diag(gram)) to the diagonal first (as GPTQ damps its Hessian): weak,
    poorly estimated eigen-directions are then amplified less by the back-projection. Undamped,
    eigen-directions below gram_noise(gram) are absent and dropped; damped, every direction is kept
    (the damped spectrum is never cut: each eigenvalue is >= damp * mean(diag)). Pass the Gram in
    the precision it was accumulated in: the noise bound is taken from its dtype.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name}: expected a square gram, got shape {tuple(gram.shape)}")
    check_finite(gram, "gram", name)
    d_in = gram.shape[0]
    s64 = gram.to(torch.float64)
    s64 = (s64 + s64.T) / 2  # (d_in, d_in); accumulation leaves tiny asymmetries
    mean_diag = s64.diagonal().mean()
    if damp > 0:
        s64 = s64 + damp * mean_diag * torch.eye(d_in, dtype=s64.dtype, device=s64.device)
    eigvals, eigvecs = torch.linalg.eigh(s64)  # ascending, (d_in,), (d_in, d_in)
    if damp > 0:
        kept = eigvals > 0 if mean_diag > 0 else torch.zeros_like(eigvals, dtype=torch.bool)
    else:
        kept = eigvals > gram_noise(gram)
    return Eigenspace(q=eigvecs[:, kept], root=eigvals[kept].sqrt(), damp=damp)


def eora_decompose(dw: Tensor, gram: Tensor, name: str = "", damp: float = 0.0,
                   space: Eigenspace | None = None) -> LowRankFactors:
    """Eigenspace-projected SVD of dw (d_out, d_in) under input second moment gram (d_in, d_in).

    space: gram_eigenspace(gram, damp=damp), when the caller decomposed this Gram already (once per
    shared input); computed here otherwise. See gram_eigenspace for damp and the cut.
    """
    _check(dw, gram, name)
    if space is None:
        space = gram_eigenspace(gram, name, damp)
    elif space.damp != damp or space.q.shape[0] != dw.shape[1]:
        raise ValueError(f"{name}: the eigenspace given is of another Gram (damp {space.damp}, "
                         f"d_in {space.q.shape[0]}) than this call's (damp {damp}, d_in {dw.shape[1]})")
    projected, back = project(dw, space)
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)  # (d_out, p), (p,), (p, k)
    check_finite(s, "projected singular values", name)
    return _real_directions(u, s, vh, back, dw.shape[1], dw.dtype)


def project(dw: Tensor, space: Eigenspace) -> tuple[Tensor, Tensor]:
    """(dW Q diag(sqrt l) (d_out, k), diag(1/sqrt l) Q^T (k, d_in)), fp64: the error EoRA decomposes and the
    map from its right factor back to the input space."""
    q, root = space.q, space.root  # (d_in, k), (k,)
    projected = (dw.to(torch.float64) @ q) * root.unsqueeze(0)  # (d_out, k)
    return projected, (q / root.unsqueeze(0)).T.contiguous()


def svd_decompose(dw: Tensor, name: str = "") -> LowRankFactors:
    """Plain SVD of dw (d_out, d_in) in fp64."""
    _check(dw, None, name)
    u, s, vh = torch.linalg.svd(dw.to(torch.float64), full_matrices=False)
    return _real_directions(u, s, vh, None, dw.shape[1], dw.dtype)


def eora(dw: Tensor, gram: Tensor, rank: int, name: str = "", damp: float = 0.0,
         space: Eigenspace | None = None) -> tuple[Tensor, Tensor]:
    """(B (d_out, r), A (r, d_in)) fp32 minimising E||(dW - BA) x||^2 under gram (+ damping); r is at most
    rank, fewer when fewer real directions exist. space: see eora_decompose."""
    b, a = eora_decompose(dw, gram, name, damp, space).lowrank(rank)
    check_finite(b, "EoRA B", name)
    check_finite(a, "EoRA A", name)
    return b, a


def svd_baseline(dw: Tensor, gram: Tensor | None, rank: int, name: str = "") -> tuple[Tensor, Tensor]:
    """(B, A) from the rank-`rank` SVD of dw (fewer rows when dw has fewer directions); gram is accepted
    for a common signature and unused."""
    return svd_decompose(dw, name).lowrank(rank)


def projected_singular_values(dw: Tensor, gram: Tensor, name: str = "") -> Tensor:
    """Singular values (fp32, descending) of dW Q diag(sqrt l), for rank allocation."""
    return eora_decompose(dw, gram, name).singular_values
