"""Stacking client pairs (FLoRA's construction, FLoRIST's first step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LoraFactors, fold_scaling


def stack(factors: Sequence[LoraFactors], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """B_st = [s_1 B_1 ... s_K B_K] (m x sum r_k) and A_st = [w_1 A_1; ...; w_K A_K] (sum r_k x n).

    B_st @ A_st = sum_k w_k s_k B_k A_k exactly. Each client appears once, with its own weight.
    """
    B_st = torch.cat([fold_scaling(f) for f in factors], dim=1)
    A_st = torch.cat([w * f.A for f, w in zip(factors, weights, strict=True)], dim=0)
    return B_st, A_st
