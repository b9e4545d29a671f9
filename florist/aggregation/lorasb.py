"""LoRA-SB's start: the best rank-r approximation of an approximate first full fine-tuning step, as B · R · A.

Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization Using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning", 2024 (arXiv 2411.19557). Adam's first step on a weight W is
``-lr · sign(g)`` (its moments are g and g², so the step is lr · g / |g|); LoRA-SB takes the gradient g summed over
a small sample of the training data, and starts B, R and A from the truncated SVD of that step,
``U_r diag(σ_r) V_rᵀ``: B = U_r (m × r) and A = V_rᵀ (r × n) stay frozen, R = diag(σ_r) trains. The start is then
the Eckart–Young best rank-r approximation of the first step, and later updates stay in the span of U_r and V_r.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_step_start(gradient: Tensor, rank: int, lr: float) -> tuple[Tensor, Tensor, Tensor]:
    """(B, R, A) with B R A the best rank-``rank`` approximation of ``-lr · sign(gradient)`` (m × n), float32.

    B's columns and A's rows are in order of the singular values, so a smaller rank's start is the leading block.
    The SVD runs in float64; a zero gradient gives a zero R (its singular vectors are then arbitrary but fixed).
    """
    m, n = gradient.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is outside 1..{min(m, n)} for a {m} x {n} gradient")
    step = -lr * torch.sign(gradient.double())
    U, S, Vh = torch.linalg.svd(step, full_matrices=False)
    return U[:, :rank].float().contiguous(), torch.diag(S[:rank]).float(), Vh[:rank].float().contiguous()
