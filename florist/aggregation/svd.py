"""The SVD of a product B @ A from its factors, and singular value thresholding.

Two exact routes, both batched over modules of one shape and neither forming the m x n product:
``householder_svd`` (QR of each factor in the inputs' dtype) for float64 inputs, where it is exact to float64
rounding whatever the conditioning; ``gram_svd`` (eigendecompositions of the factors' R x R Gram matrices, in
float64) for float32 and narrower inputs, where float64 Grams are exact to the inputs' own rounding and cost a
third of the QR route. ``stacked_svd`` picks between them by dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .base import ModuleAggregate

GRAM_DTYPE = torch.float64  # the Gram route's arithmetic: it squares the factors' condition numbers

RankRule = Callable[[Tensor], int]  # from the descending spectra (batch x k) to how many components to form

# Singular vectors are formed this many at a time, so each one's value does not depend on how many are formed:
# a sweep's adapters equal each τ's alone, bit for bit (one wider product may round differently).
VECTOR_BLOCK = 64


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the R x R decompositions on one thread. They split into many short parallel regions, each a wake-up of
    the other threads: with passive waiting (florist's default, ``florist.threads``) a batch of 128 x 128 eigh
    took 5x longer on two threads than on one, and even spinning threads gain nothing on matrices this small.
    torch's thread count is the process's: call it from the one thread that aggregates, as florist's engines do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stacked_svd(B: Tensor, A: Tensor, rank: RankRule | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` (B: ... x m x R, A: ... x R x n, batched over leading dimensions) from its factors.

    Returns (U, S, Vh): k = min(m, n, R) singular values, descending (in B's dtype; float32 for narrower inputs),
    signs made canonical, and U, Vh cut to ``rank(S)`` leading components (all k when ``rank`` is None): a caller
    that keeps p of them pays O((m + n) R p) to form them, not O((m + n) R^2).
    """
    if B.dtype == torch.float64:
        return householder_svd(B, A, rank)
    if B.dtype != torch.float32:  # half precision: the route's rounding floor is float32's, results in float32
        B, A = B.float(), A.float()
    return gram_svd(B, A, rank)


def householder_svd(B: Tensor, A: Tensor, rank: RankRule | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The QR route: B = Q_B R_B, A^T = Q_A R_A, so B A = Q_B (R_B R_A^T) Q_A^T; the SVD of the small
    P = R_B R_A^T = U_P S V_P^T gives B A = (Q_B U_P) S (Q_A V_P)^T. Work O((m + n) R^2), exact in B's dtype."""
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.mT, mode="reduced")
    with one_thread():
        U_P, S, Vh_P = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    p = S.shape[-1] if rank is None else rank(S)
    U, Vh = signed_vectors(Q_B, U_P, Vh_P, Q_A.mT, p)
    return U, S, Vh


def gram_svd(B: Tensor, A: Tensor, rank: RankRule | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The Gram route, for float32 inputs: arithmetic in float64, U formed in float32, Vh in float64 then rounded.

    A A^T = W D W^T (R x R). With T = W D^{1/2} the rows of D^{-1/2} W^T A are orthonormal and
    B A = (B T)(D^{-1/2} W^T A), so the SVD of B A is that of C = B T: C^T C = T^T (B^T B) T = V Λ V^T gives
    S = Λ^{1/2}, U = B (T V S^{-1}) and Vh = (V^T D^{-1/2} W^T) A. Only R x R matrices are decomposed; the m- and
    n-sized work is two Grams and two products with p columns.

    Each rank component is first balanced (``balancing``: ||B's column|| = ||A's row||, by powers of two), so that A's
    spectrum speaks for the product's. Directions of A whose singular values are then at the inputs' rounding level
    (below R eps sigma_max, the rule ``numerical_rank`` uses) are dropped: what they carry is below the inputs' own
    precision, and dividing by them would amplify float64's rounding past the inputs'.
    """
    out = B.dtype
    B64, A64 = B.to(GRAM_DTYPE), A.to(GRAM_DTYPE)
    G_A, G_B = A64 @ A64.mT, B64.mT @ B64
    del B64
    k = min(B.shape[-2], *A.shape[-2:])  # as many components as B @ A can have, as the QR route returns
    with one_thread():
        c = balancing(G_A, G_B)
        outer = c[..., :, None] * c[..., None, :]
        S, X, Z = gram_core(G_A / outer, G_B * outer, k, rtol=A.shape[-2] * torch.finfo(out).eps)
        X, Z = X * c[..., :, None], Z / c[..., :, None]  # U = (B C) X and Vh = Z^T (C^-1 A), C = diag(c)
    p = S.shape[-1] if rank is None else rank(S.to(out))
    # Vh from float64 A: its rows' orthonormality would otherwise lose float32's rounding times A's condition
    U, Vh = signed_vectors(B, X.to(out), Z.mT, A64, p)
    S, Vh = S.to(out), Vh.to(out)
    zero = S[..., 0] == 0  # an all-zero update: no direction to take A's rows from, so take them as QR does
    if zero.any():
        U[zero], Vh[zero] = (t.to(out) for t in householder_svd(B[zero].double(), A[zero].double(), lambda _: p)[::2])
    return U, S, Vh


def balancing(G_A: Tensor, G_B: Tensor) -> Tensor:
    """Powers of two c_j that balance each rank component, ||c_j b_j|| = ||a_j / c_j|| (b_j B's column, a_j A's row;
    their squared norms are the Grams' diagonals). The product B A = (B C)(C^-1 A) is unchanged, and scaling by a
    power of two is exact, so balancing costs only R x R work; it keeps a client that sends a large B with a small A
    (weights fold into A too) from being read as rounding by the cut on A's spectrum."""
    a, b = torch.diagonal(G_A, dim1=-2, dim2=-1), torch.diagonal(G_B, dim1=-2, dim2=-1)
    both = (a > 0) & (b > 0)
    exponent = torch.where(both, torch.log2(torch.where(both, a / b, 1.0)) / 4, 0.0).round()  # sqrt of norms' ratio
    return torch.exp2(exponent)


def gram_core(G_A: Tensor, G_B: Tensor, k: int, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """From G_A = A A^T and G_B = B^T B (R x R): the k singular values of B A, descending, and the R x k maps X
    and Z with U = B X and Vh = Z^T A (see ``gram_svd``). A's directions of singular value at most ``rtol`` times
    its largest are dropped."""
    D, W = torch.linalg.eigh(G_A)  # ascending
    kept = D > D[..., -1:].clamp(min=0) * rtol**2
    root = torch.where(kept, D.clamp(min=0).sqrt(), 0.0)
    T = W * root[..., None, :]  # W D^{1/2}, dropped directions zeroed
    M = T.mT @ G_B @ T
    lam, V = torch.linalg.eigh((M + M.mT) / 2)
    lam, V = lam.flip(-1)[..., :k], V.flip(-1)[..., :k]  # descending
    S = lam.clamp(min=0).sqrt()
    tiny = torch.finfo(G_A.dtype).tiny
    X = (T @ V) * torch.where(S > 0, 1 / S.clamp(min=tiny), 0.0)[..., None, :]
    Z = (W * torch.where(kept, D.clamp(min=tiny).rsqrt(), 0.0)[..., None, :]) @ V
    return S, X, Z


def signed_vectors(B: Tensor, X: Tensor, Yh: Tensor, A: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """U = B X[..., :p] and Vh = Yh[..., :p, :] A with canonical signs (``canonical_signs``' rule). The flips go
    into U in place and into the small Yh before Vh is formed, so neither large result is copied again (a flip is
    exact: Vh equals the flipped product bit for bit)."""
    U = leading_columns(B, X, p)
    signs = largest_entry_signs(U)
    U.mul_(signs)
    flips = torch.ones_like(Yh[..., :1])
    flips[..., :p, :] = signs.mT.to(Yh.dtype)
    return U, leading_rows(Yh * flips, A, p)


def leading_columns(left: Tensor, right: Tensor, p: int) -> Tensor:
    """``left @ right[..., :p]``, formed ``VECTOR_BLOCK`` columns at a time (see there)."""
    blocks = [left @ right[..., j : j + VECTOR_BLOCK] for j in range(0, p, VECTOR_BLOCK)]
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1))[..., :p]


def leading_rows(left: Tensor, right: Tensor, p: int) -> Tensor:
    """``left[..., :p, :] @ right``, formed ``VECTOR_BLOCK`` rows at a time (see there)."""
    blocks = [left[..., j : j + VECTOR_BLOCK, :] @ right for j in range(0, p, VECTOR_BLOCK)]
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2))[..., :p, :]


def canonical_signs(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flip each singular pair so the largest entry of its U column is positive (batched over leading dimensions).

    An SVD is unique only up to the sign of each pair; fixing it makes results comparable
    across routes (stacked vs dense), engines and devices.
    """
    signs = largest_entry_signs(U)
    return U * signs, S, Vh * signs.mT


def largest_entry_signs(U: Tensor) -> Tensor:
    """The sign (+1 or -1, ... x 1 x p) of each U column's largest entry in magnitude, +1 on a tie or a zero column."""
    low, high = torch.aminmax(U, dim=-2, keepdim=True)  # one pass; the largest |entry| is high or -low
    return torch.where(high >= -low, 1.0, -1.0).to(U.dtype)


def numerical_rank(S: Tensor, rtol: float | None = None) -> int:
    """How many singular values are above round-off: S_i > rtol * S_max (numpy's matrix_rank rule)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    if rtol is None:
        rtol = S.numel() * torch.finfo(S.dtype).eps
    return int((S > S[0] * rtol).sum())


def energy_rank(S: Tensor, threshold: float, rtol: float | None = None) -> int:
    """The smallest p whose energy sum_{i<=p} S_i^2 / sum_i S_i^2 reaches ``threshold``.

    S must be descending. Singular values at round-off level are not counted as components,
    so threshold 1 keeps the numerical rank, not noise. At least 1 (an adapter has rank >= 1).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    r = numerical_rank(S, rtol)
    if r == 0:
        return 1
    cumulative = S[:r].double().square().cumsum(0)
    energy = cumulative / cumulative[-1]
    p = int(torch.searchsorted(energy, torch.tensor([threshold], dtype=energy.dtype, device=energy.device)).item()) + 1
    return min(p, r)


def truncation(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> ModuleAggregate:
    """The top-``rank`` components as a pair, singular values in B (B = U_r diag(S_r), A = V_r^T), with the whole
    spectrum kept for reports. Copies, so the full U and Vh can be freed."""
    return ModuleAggregate(A=Vh[:rank].clone(), B=U[:, :rank] * S[:rank], singular_values=S)
