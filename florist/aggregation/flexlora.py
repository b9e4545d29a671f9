"""FlexLoRA: form the dense update, take its full SVD, give each client its own rank-r_k truncation.

Exact up to each client's rank, but it builds the m x n matrix and pays an
O(m n min(m, n)) SVD per module: the cost FLoRIST avoids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import AggregationMethod, AggregationResult, ClientUpdate, ModuleAggregate, fold_scaling, linalg_failures
from .svd import canonical_signs


class FlexLoRA(AggregationMethod):
    name = "flexlora"

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
        per_client: list[dict[str, ModuleAggregate]] = [{} for _ in updates]
        modules = {}
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            delta = sum(w * (fold_scaling(f) @ f.A) for f, w in zip(factors, weights))
            with linalg_failures(self.name, name):
                U, S, Vh = canonical_signs(*torch.linalg.svd(delta, full_matrices=False))
            for k, f in enumerate(factors):
                per_client[k][name] = truncation(U, S, Vh, f.rank)
            modules[name] = truncation(U, S, Vh, max(f.rank for f in factors))
        return AggregationResult(self.name, modules, per_client=per_client, weights=list(weights))


def truncation(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> ModuleAggregate:
    """The best rank-``rank`` pair: B = U_r diag(S_r), A = V_r^T (singular values go to B)."""
    return ModuleAggregate(A=Vh[:rank].clone(), B=U[:, :rank] * S[:rank], singular_values=S)
