"""FLoRIST: exact SVD of the stacked update from its factors, then singular value thresholding.

The stack B_st @ A_st equals the exact federated update. Its SVD comes from the stacks' QR
factors and the SVD of a small (sum r_k)^2 matrix, never from the m x n product. Keeping the
smallest p components whose energy reaches tau gives one rank-p pair per module, shared by
every client; p differs per module. tau = 1 reproduces the exact update.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import AggregationMethod, AggregationResult, ClientUpdate, ModuleAggregate
from .stacking import stack
from .svd import energy_rank, stacked_svd

Decomposition = dict[str, tuple[Tensor, Tensor, Tensor]]


class FLoRIST(AggregationMethod):
    name = "florist"

    def __init__(self, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
        return threshold_decomposition(decompose(updates, weights), self.threshold, weights)


def decompose(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Decomposition:
    """Per module, the SVD (U, S, Vh) of the exact weighted update. Shared by every tau of a sweep."""
    out = {}
    for name in updates[0].modules:
        B_st, A_st = stack([u.modules[name] for u in updates], weights)
        out[name] = stacked_svd(B_st, A_st)
    return out


def threshold_decomposition(svds: Decomposition, threshold: float, weights: Sequence[float]) -> AggregationResult:
    """Keep, per module, the top-p components whose energy reaches ``threshold``; singular values go to B."""
    modules = {}
    for name, (U, S, Vh) in svds.items():
        p = energy_rank(S, threshold)
        modules[name] = ModuleAggregate(A=Vh[:p].contiguous(), B=U[:, :p] * S[:p], singular_values=S)
    return AggregationResult(FLoRIST.name, modules, weights=list(weights))


def sweep(updates: Sequence[ClientUpdate], weights: Sequence[float], thresholds: Sequence[float]) -> dict[float, AggregationResult]:
    """FLoRIST at every tau from one decomposition: the sweep costs one SVD per module, not one per tau."""
    svds = decompose(updates, weights)
    return {t: threshold_decomposition(svds, t, weights) for t in thresholds}
