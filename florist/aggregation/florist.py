"""FLoRIST: exact SVD of the stacked update from its factors, then singular value thresholding.

The stack B_st @ A_st equals the exact federated update. Its SVD comes from the stacks' QR
factors and the SVD of a small (sum r_k)^2 matrix, never from the m x n product. Keeping the
smallest p components whose energy reaches tau gives one rank-p pair per module, shared by
every client; p differs per module. tau = 1 reproduces the exact update.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import AggregationMethod, AggregationResult, ClientUpdate, ModuleAggregate, linalg_failures
from .stacking import stack
from .svd import energy_rank, stacked_svd
from .validate import check_result


class FLoRIST(AggregationMethod):
    name = "florist"

    def __init__(self, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
        return sweep(updates, weights, [self.threshold])[self.threshold]


def sweep(
    updates: Sequence[ClientUpdate], weights: Sequence[float], thresholds: Sequence[float]
) -> dict[float, AggregationResult]:
    """FLoRIST at every tau from one decomposition per module: a sweep costs one SVD per module, not one per tau.

    Modules are done one at a time and only the kept components are copied out, so the working
    set is one module's stacks plus the outputs, never every module's full decomposition.
    Every result is checked (``check_result``): a decomposition that fails or yields NaN is an ``AggregationError``.
    """
    per_tau: dict[float, dict[str, ModuleAggregate]] = {t: {} for t in thresholds}
    for name in updates[0].modules:
        B_st, A_st = stack([u.modules[name] for u in updates], weights)
        with linalg_failures(FLoRIST.name, name):
            U, S, Vh = stacked_svd(B_st, A_st)
        for t in thresholds:
            per_tau[t][name] = keep_top(U, S, Vh, energy_rank(S, t))
    return {
        t: check_result(AggregationResult(FLoRIST.name, modules, weights=list(weights)))
        for t, modules in per_tau.items()
    }


def keep_top(U: Tensor, S: Tensor, Vh: Tensor, p: int) -> ModuleAggregate:
    """The top-p components as a pair, singular values in B; copies, so the full U and Vh can be freed."""
    return ModuleAggregate(A=Vh[:p].clone(), B=U[:, :p] * S[:p], singular_values=S)
