"""FLoRIST's rule: exact SVD of the stacked update from its factors, then singular value thresholding.

The stack B_st @ A_st equals the exact federated update. Its SVD comes from the stacks' R x R Gram (or QR)
factors, never from the m x n product, batched over the modules that share a shape. Keeping the smallest p
components whose energy reaches tau gives one rank-p pair per module, shared by every client; p differs per
module. tau = 1 reproduces the exact update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Adapter, ClientUpdate, linalg_failures
from .stacking import same_shape_batches, stack_batch
from .svd import RankRule, energy_rank, stacked_svd, truncation


def thresholded(
    updates: Sequence[ClientUpdate], weights: Sequence[float], taus: Sequence[float]
) -> dict[float, Adapter]:
    """The thresholded adapter at every tau, from one decomposition per module: a sweep costs one SVD per module,
    not one per tau.

    Only the components the widest module of a batch keeps at the largest tau are formed, and only the kept ones
    are copied out, so the working set is one batch's stacks plus the outputs, never every module's decomposition.
    """
    per_tau: dict[float, Adapter] = {t: {} for t in taus}
    for names in same_shape_batches(updates):
        B_st, A_st = stack_batch(updates, weights, names)
        widest = lambda S: max(energy_rank(s, t) for s in S for t in taus)  # noqa: E731
        U, S, Vh = decomposed(B_st, A_st, names, widest)
        for i, name in enumerate(names):
            for t in taus:
                per_tau[t][name] = truncation(U[i], S[i], Vh[i], energy_rank(S[i], t))
    return per_tau


def decomposed(B_st: Tensor, A_st: Tensor, names: Sequence[str], rank: RankRule) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's stacked SVD; a failure is an ``AggregationError`` naming the module whose decomposition fails,
    found by redoing them one at a time (only on that path)."""
    try:
        return stacked_svd(B_st, A_st, rank=rank)
    except torch.linalg.LinAlgError:
        for i, name in enumerate(names):
            with linalg_failures("florist", name):
                stacked_svd(B_st[i], A_st[i])
        others = f" or one of the {len(names) - 1} others of its shape" if len(names) > 1 else ""
        with linalg_failures("florist", names[0] + others):
            raise
