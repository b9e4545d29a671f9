"""FLoRA: send the whole stack down. Exact, but its rank is the sum of the clients' ranks."""

from __future__ import annotations

from collections.abc import Sequence

from .base import AggregationMethod, AggregationResult, ClientUpdate, ModuleAggregate
from .stacking import stack


class FLoRA(AggregationMethod):
    name = "flora"

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
        modules = {}
        for name in updates[0].modules:
            B_st, A_st = stack([u.modules[name] for u in updates], weights)
            modules[name] = ModuleAggregate(A=A_st, B=B_st)
        return AggregationResult(self.name, modules, weights=list(weights))
