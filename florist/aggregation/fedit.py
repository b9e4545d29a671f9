"""FedIT's rule: average A and B separately (FedAvg on LoRA factors).

mean(B) @ mean(A) != mean(B @ A): the difference is the aggregation noise the exact rules remove.
Ranks that differ are zero-padded to the largest.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Adapter, ClientUpdate, ModuleAggregate, fold_scaling, zero_pad


def average_factors(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Adapter:
    """Per module, the weighted means of the clients' B (scaling folded in) and of their A."""
    modules = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        r = max(f.rank for f in factors)
        B = sum(w * zero_pad(fold_scaling(f), r, dim=1) for f, w in zip(factors, weights))
        A = sum(w * zero_pad(f.A, r, dim=0) for f, w in zip(factors, weights))
        modules[name] = ModuleAggregate(A=A, B=B)
    return modules
