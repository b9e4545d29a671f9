"""FLoRIST from two sums over the clients: the exact thresholded update, the server holding no client's own pair.

FLoRIST stacks every client's factors, so the server sees each client's adapter. Yet the SVD it needs can be had
from sums alone. ΔW = Σ_k w_k s_k B_k A_k (m × n) has rank at most R = Σ_k r_k. With Ω (n × W, W = R plus an
oversampling) drawn from a seed every client knows:

1. each client sends Y_k = w_k s_k B_k (A_k Ω) (m × W); their sum is Y = ΔW Ω, whose column space is ΔW's
   (almost surely: for a Gaussian Ω, V_rᵀ Ω has full row rank, V_r spanning ΔW's rows), and the server takes
   Q = orth(Y);
2. each client sends Z_k = (Qᵀ w_k s_k B_k) A_k (W × n); their sum is Z = Qᵀ ΔW, and since Q Qᵀ ΔW = ΔW,
3. the SVD Z = U_Z S V_Zᵀ gives ΔW = (Q U_Z) S V_Zᵀ exactly; thresholding by τ is then FLoRIST's.

A secure aggregation (masking each share so that only the sums come out) is the transport's part; here the sums are
plain, the mathematics. Everything is float64 on the server's side. A client uploads (m + n)·W numbers a module in
two exchanges, against (m + n)·r_k for FLoRIST, and downloads Q (m × W) between them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Adapter, ClientUpdate, LoraFactors, linalg_failures
from .svd import canonical_signs, energy_rank, truncation

WORK_DTYPE = torch.float64


def sketch(seed: int, name: str, n: int, width: int) -> Tensor:
    """Ω (n × width), standard Gaussian, the same on every client and the server: drawn from ``seed`` and the
    module's ``name`` alone."""
    salt = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")
    g = torch.Generator().manual_seed((seed ^ salt) & (2**63 - 1))
    return torch.randn(n, width, generator=g, dtype=WORK_DTYPE)


def sketch_width(ranks: Sequence[int], m: int, n: int, oversampling: int = 0) -> int:
    """W: the stack's rank bound Σ r_k plus ``oversampling`` columns (a margin against rounding, not needed for
    exactness), at most min(m, n): ΔW's rank cannot exceed it, and so Y and Z need no more columns or rows."""
    if oversampling < 0:
        raise ValueError(f"oversampling must be 0 or more, got {oversampling}")
    return min(sum(ranks) + oversampling, m, n)


def range_share(pair: LoraFactors, weight: float, omega: Tensor) -> Tensor:
    """Y_k = w_k s_k B_k (A_k Ω) (m × W): a client's first share, never its m × n update."""
    A, B = pair.A.to(WORK_DTYPE), pair.B.to(WORK_DTYPE)
    return (weight * pair.scaling) * (B @ (A @ omega))


def range_basis(Y: Tensor) -> Tensor:
    """Q (m × min(m, W)): orthonormal columns spanning the summed first shares' column space."""
    return torch.linalg.qr(Y.to(WORK_DTYPE), mode="reduced")[0]


def projection_share(pair: LoraFactors, weight: float, Q: Tensor) -> Tensor:
    """Z_k = (Qᵀ w_k s_k B_k) A_k (W × n): a client's second share."""
    A, B = pair.A.to(WORK_DTYPE), pair.B.to(WORK_DTYPE)
    return ((weight * pair.scaling) * (Q.mT @ B)) @ A


def from_sums(Q: Tensor, Z: Tensor, rank_bound: int) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of ΔW = Q Z from the basis and the summed second shares: (U, S, Vh), at most ``rank_bound``
    components (ΔW's rank bound, min(m, n, Σ r_k): the rest are zero), signs canonical as FLoRIST's."""
    U_Z, S, Vh = torch.linalg.svd(Z.to(WORK_DTYPE), full_matrices=False)
    k = min(rank_bound, S.numel())
    return canonical_signs(Q @ U_Z[:, :k], S[:k], Vh[:k])


def thresholded_from_sums(
    updates: Sequence[ClientUpdate], weights: Sequence[float], taus: Sequence[float], seed: int, oversampling: int = 0
) -> dict[float, Adapter]:
    """Private FLoRIST in one process: both exchanges with plain sums, then FLoRIST's thresholding at every tau.
    Equals ``florist.thresholded`` to rounding; float64 results."""
    per_tau: dict[float, Adapter] = {t: {} for t in taus}
    for name in updates[0].modules:
        pairs = [u.modules[name] for u in updates]
        (m, n), ranks = pairs[0].shape, [p.rank for p in pairs]
        bound = min(m, n, sum(ranks))  # ΔW's rank bound
        # components at the inputs' rounding are not counted, by the inputs' precision as FLoRIST counts them
        rtol = bound * torch.finfo(pairs[0].A.dtype).eps
        with linalg_failures("privflorist", name):
            omega = sketch(seed, name, n, sketch_width(ranks, m, n, oversampling)).to(pairs[0].A.device)
            Q = range_basis(sum(range_share(p, w, omega) for p, w in zip(pairs, weights, strict=True)))
            Z = sum(projection_share(p, w, Q) for p, w in zip(pairs, weights, strict=True))
            U, S, Vh = from_sums(Q, Z, bound)
        for t in taus:
            per_tau[t][name] = truncation(U, S, Vh, energy_rank(S, t, rtol))
    return per_tau


def share_sizes(m: int, n: int, width: int) -> tuple[int, int]:
    """The numbers a client uploads for one module in each exchange: Y_k (m·W), then Z_k (W·n)."""
    return m * width, width * n
