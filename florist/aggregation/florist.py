"""FLoRIST's rule: exact SVD of the stacked update from its factors, then singular value thresholding.

The stack B_st @ A_st equals the exact federated update. Its SVD comes from the stacks' QR
factors and the SVD of a small (sum r_k)^2 matrix, never from the m x n product. Keeping the
smallest p components whose energy reaches tau gives one rank-p pair per module, shared by
every client; p differs per module. tau = 1 reproduces the exact update.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Adapter, ClientUpdate, linalg_failures
from .stacking import stack
from .svd import energy_rank, stacked_svd, truncation


def thresholded(
    updates: Sequence[ClientUpdate], weights: Sequence[float], taus: Sequence[float]
) -> dict[float, Adapter]:
    """The thresholded adapter at every tau, from one decomposition per module: a sweep costs one SVD per module,
    not one per tau.

    Modules are done one at a time and only the kept components are copied out, so the working
    set is one module's stacks plus the outputs, never every module's full decomposition.
    """
    per_tau: dict[float, Adapter] = {t: {} for t in taus}
    for name in updates[0].modules:
        B_st, A_st = stack([u.modules[name] for u in updates], weights)
        with linalg_failures("florist", name):
            U, S, Vh = stacked_svd(B_st, A_st)
        for t in taus:
            per_tau[t][name] = truncation(U, S, Vh, energy_rank(S, t))
    return per_tau
