"""Distances between low-rank updates, computed from their factors."""

from __future__ import annotations

import torch
from torch import Tensor


def factored_frobenius(B: Tensor, A: Tensor) -> float:
    """||B @ A||_F without forming the product: sqrt(trace((B^T B)(A A^T))), O((m+n) r^2)."""
    return float(torch.sqrt(torch.clamp(((B.mT @ B) * (A @ A.mT)).sum(), min=0)))


def relative_error(approx: tuple[Tensor, Tensor], exact: tuple[Tensor, Tensor]) -> float:
    """||B1 A1 - B2 A2||_F / ||B2 A2||_F from the two factor pairs (B, A)."""
    (B1, A1), (B2, A2) = approx, exact
    B2, A2 = B2.to(B1.dtype), A2.to(B1.dtype)
    diff = factored_frobenius(torch.cat([B1, -B2], dim=1), torch.cat([A1, A2], dim=0))
    norm = factored_frobenius(B2, A2)
    return diff / norm if norm > 0 else diff
