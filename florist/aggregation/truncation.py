"""A client's own update cut to the components that carry a share of its energy: the upload of two-way compression.

A client's update s·B·A (rank r) has the SVD U Σ Vᵀ, found from its factors as the server finds the stack's
(``householder_svd``: QR of each factor and the SVD of an r × r core, never the m × n product). Keeping the smallest p
whose energy Σ_{i≤p} σ_i² / Σ_i σ_i² reaches τ_up gives the best rank-p approximation of the update. It is sent in
the server's own download form, singular values in B: B' = U_p Σ_p / s and A' = V_pᵀ, the client's scaling s kept,
so s·B'·A' = U_p Σ_p V_pᵀ. The whole spectrum Σ (r numbers) travels beside it.

The cut is nested: the cut at a lower τ is the leading components of the cut at a higher one, with p read off the
same spectrum. So one upload at the largest τ_up a round asks for serves every lower τ_up (``leading_components``),
exactly as if the client had been asked for that τ_up, and the server can check that what arrived is such a cut
(``truncation_problem``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LoraFactors, fold_scaling
from .svd import energy_rank, householder_svd

# How far from the exact form an upload said to be cut may be, relative to its largest singular value: float32
# QR and SVD reach about 1e-6; more slack than that only admits uploads that are not a truncation at all.
FORM_RTOL = 1e-4


def truncated_pair(pair: LoraFactors, tau: float) -> tuple[LoraFactors, Tensor]:
    """The pair cut to the fewest components whose energy reaches ``tau``, and the update's whole spectrum
    (descending, one value per component of the pair's rank). ``tau`` = 1 keeps the numerical rank."""
    # QR in float64 whatever the pair's dtype: the server checks the cut's form to FORM_RTOL, and a client's own A
    # may be ill-conditioned enough for the Gram route's rows to miss it; one client's r columns cost little
    U, S, Vh = (t.to(pair.A.dtype) for t in householder_svd(fold_scaling(pair).double(), pair.A.double()))
    p = energy_rank(S, tau)
    return LoraFactors(A=Vh[:p].clone(), B=U[:, :p] * (S[:p] / pair.scaling), scaling=pair.scaling), S


def leading_components(pair: LoraFactors, p: int) -> LoraFactors:
    """The first ``p`` components of a pair in the cut form (A's leading rows, B's leading columns)."""
    if p >= pair.rank:
        return pair
    return LoraFactors(A=pair.A[:p], B=pair.B[:, :p], scaling=pair.scaling)


def recut(pair: LoraFactors, spectrum: Tensor, tau: float) -> LoraFactors:
    """A pair already cut (at τ_up ≥ ``tau``, ``spectrum`` its update's whole spectrum) cut again at ``tau``."""
    return leading_components(pair, energy_rank(spectrum, tau))


def truncation_problem(pair: LoraFactors, spectrum: object, tau: float, max_rank: int) -> str:
    """What is wrong with an upload said to be the cut of a rank-``max_rank`` update at energy ``tau``, or "".

    The spectrum must be a finite, non-negative, descending vector of at most ``max_rank`` values; the pair's rank
    must be the one the spectrum needs at ``tau`` (so a client cannot send more than it claims, nor claim less
    than it sends); and the pair must be in the cut form: A's rows orthonormal, s·B's columns orthogonal with the
    spectrum's leading values as their norms.
    """
    if not isinstance(spectrum, Tensor) or spectrum.dim() != 1 or not spectrum.is_floating_point():
        return "its spectrum is not a vector of floats"
    if not 1 <= spectrum.numel() <= max_rank:
        return f"its spectrum has {spectrum.numel()} values, not 1 to the rank {max_rank} it trained at"
    S = spectrum.double()
    if not torch.isfinite(S).all() or (S < 0).any() or (S[1:] > S[:-1]).any():
        return "its spectrum is not finite, non-negative and descending"
    p, needed = pair.rank, energy_rank(spectrum, tau)
    if p != needed:
        return f"it sends rank {p}, but its spectrum needs rank {needed} at upload threshold {tau:g}"
    A, B = pair.A.double(), fold_scaling(pair).double()
    top = float(S[0])
    if top == 0.0:
        return "" if B.abs().max() == 0 else "its spectrum is zero but its update is not"
    eye = torch.eye(p, dtype=A.dtype, device=A.device)
    if (A @ A.mT - eye).abs().max() > FORM_RTOL * math.sqrt(p):
        return "its A is not in the cut form (rows orthonormal)"
    gram = B.mT @ B  # diag(σ_1², …, σ_p²) for the cut form
    if (gram - torch.diag(S[:p].square())).abs().max() > FORM_RTOL * top**2 * math.sqrt(p):
        return "its B is not in the cut form (orthogonal columns whose norms are the spectrum's leading values)"
    return ""
