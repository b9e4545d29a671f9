"""The SVD of a product B @ A from its factors, and singular value thresholding."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ModuleAggregate


def stacked_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` (B: m x R, A: R x n) without ever forming the m x n product.

    QR of each factor moves the problem into an R x R space: B = Q_B R_B, A^T = Q_A R_A, so
    B A = Q_B (R_B R_A^T) Q_A^T. The SVD of the small P = R_B R_A^T = U_P S V_P^T then gives
    B A = (Q_B U_P) S (Q_A V_P)^T. Work O((m+n) R^2), extra memory O((m+n) R).
    Returns (U, S, Vh) with S descending and signs made canonical.
    """
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.mT, mode="reduced")
    U_P, S, Vh_P = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    return canonical_signs(Q_B @ U_P, S, Vh_P @ Q_A.mT)


def canonical_signs(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flip each singular pair so the largest entry of its U column is positive.

    An SVD is unique only up to the sign of each pair; fixing it makes results comparable
    across routes (stacked vs dense), engines and devices.
    """
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, idx)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, S, Vh * signs[:, None]


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
    p = int(torch.searchsorted(energy, torch.tensor([threshold], dtype=energy.dtype)).item()) + 1
    return min(p, r)


def truncation(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> ModuleAggregate:
    """The top-``rank`` components as a pair, singular values in B (B = U_r diag(S_r), A = V_r^T), with the whole
    spectrum kept for reports. Copies, so the full U and Vh can be freed."""
    return ModuleAggregate(A=Vh[:rank].clone(), B=U[:, :rank] * S[:rank], singular_values=S)
