"""FlexLoRA's rule: form the dense update, take its full SVD, give each client its own rank-r_k truncation.

Exact up to each client's rank, but it builds the m x n matrix and pays an
O(m n min(m, n)) SVD per module: the cost FLoRIST avoids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Adapter, ClientUpdate, ModuleAggregate, fold_scaling, linalg_failures
from .svd import canonical_signs, truncation


def dense_truncations(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> tuple[Adapter, list[Adapter]]:
    """The dense update's SVD per module, truncated to the largest rank (the global adapter) and to each client's."""
    per_client: list[dict[str, ModuleAggregate]] = [{} for _ in updates]
    modules = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        delta = sum(w * (fold_scaling(f) @ f.A) for f, w in zip(factors, weights))
        with linalg_failures("flexlora", name):
            U, S, Vh = canonical_signs(*torch.linalg.svd(delta, full_matrices=False))
        for k, u in enumerate(updates):
            per_client[k][name] = truncation(U, S, Vh, u.rank_of(name))
        modules[name] = truncation(U, S, Vh, max(u.rank_of(name) for u in updates))
    return modules, per_client
